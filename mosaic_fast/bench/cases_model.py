"""Model suite: MosaicModel inference throughput and training-step time, reference vs fast.

CUDA (real shapes): ViT-B/16, batch 64, 224² (and 64³ volumes for the 2D+3D case), bf16.
CPU (quick): a small ViT (width 192, depth 4) at batch 8 so the suite finishes in minutes.
Inference runs the models in the benchmark dtype; training keeps fp32 weights under autocast (CUDA) and
includes the EMA teacher forward and update, as a real MOSAIC step does. Routing is what the trainer
passes: the letter "A" for a one-specialist ("single") batch, per-sample ids for a mixed one. (The H200
run of 2026-11-30 passed all-zero ids for "single", so its single rows ran the grouped kernel.)
The training steps' "err" compares one step of fresh reference and fast steps built from the same
weights (the clipped gradients of the adapters and the 3D tokenizer); peak memory counts each step on its
own, CUDA-graph pools included.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from mosaic_fast.bench.core import Case, on_triton_backend
from mosaic_fast.engine.trainer import build_adamw, drop_absent_specialist_grads, specialist_parameters
from mosaic_fast.graphs import CUDAGraphInference, CUDAGraphTraining
from mosaic_fast.models import EMATeacher, MosaicModel
from mosaic_fast.nn.frozen_cast import cached_casts


def _config(quick: bool) -> dict:
    if quick:
        return dict(embed_dim=192, depth=4, num_heads=3, batch=8, batch_3d=2)
    return dict(embed_dim=768, depth=12, num_heads=12, batch=64, batch_3d=16)


def _pair(cfg: dict, device: torch.device) -> tuple[MosaicModel, MosaicModel]:
    """Reference and fast models with the same random weights (up-projections randomised too)."""
    kwargs = dict(embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"])
    ref = MosaicModel(fast=False, **kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "up_proj" in name:
                p.normal_(0.0, 0.02)
    fast = MosaicModel(fast=True, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def _images(batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g).to(device, dtype)


def _ids(batch: int, device: torch.device, seed: int, mixed: bool) -> torch.Tensor | str:
    """Routing as the trainer passes it: a letter for a one-specialist batch, per-sample ids otherwise."""
    if not mixed:
        return "A"
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (batch,), generator=g).to(device)


def _graphed_features(model: MosaicModel, mixed: bool):
    """``forward_features`` under CUDA-graph replay; a letter routing is baked into the graph."""
    if mixed:
        return CUDAGraphInference(model.forward_features)
    replay = CUDAGraphInference(lambda x: model.forward_features(x, "A"))
    return lambda x, expert: replay(x)


def _cudnn_attention(fn):
    """``fn`` with SDPA restricted to cuDNN's attention ("fast+cudnn-attn"): on Hopper it may beat the
    flash kernel at 197 tokens (unmeasured so far); SDPA raises where cuDNN cannot run, and the runner
    records that as the column's error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(*args):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return fn(*args)

    return run


def inference_cases(device: torch.device, dtype: torch.dtype, quick: bool, graphs: bool = False,
                    with_compile: bool = True) -> list[Case]:
    """Inference of the reference and fast models; with ``graphs``, the fast model under CUDA-graph replay
    ("fast+graphs"); on CUDA the fast model with cuDNN's attention ("fast+cudnn-attn") and, with
    ``with_compile``, ``torch.compile`` of the fast model too ("fast+compiled": the eager fast forward is
    device-bound, and compile fuses its LayerNorm, GELU and residual adds)."""
    cfg = _config(quick)
    ref, fast = _pair(cfg, device)
    ref, fast = ref.to(dtype).eval(), fast.to(dtype).eval()
    b, b3 = cfg["batch"], cfg["batch_3d"]

    # no_grad, not inference_mode: torch.compile of a function entering inference_mode fails ("Cannot set
    # version_counter for inference tensor") and, on torch 2.14, left the dispatcher broken for later cases.
    def ref_fwd(model):
        def run(x, ids):
            with torch.no_grad():
                return model.forward_features(x, ids)
        return run

    cases = []
    for mixed in (False, True):
        cases.append(Case(
            suite="model", name=f"mosaic_infer_{'mixedAB' if mixed else 'single'}_b{b}",
            params=dict(batch=b, mixed=mixed, **{k: cfg[k] for k in ("embed_dim", "depth")}),
            make_inputs=lambda i, mixed=mixed: (_images(b, device, dtype, i), _ids(b, device, i, mixed)),
            impls={"reference": ref_fwd(ref), "fast": ref_fwd(fast),
                   **({"fast+graphs": _graphed_features(fast, mixed)} if graphs else {}),
                   **({"fast+cudnn-attn": _cudnn_attention(ref_fwd(fast))} if device.type == "cuda" else {}),
                   **({"fast+compiled": torch.compile(ref_fwd(fast))}
                      if with_compile and device.type == "cuda" else {})},
            items_per_call=b, notes="items_per_s = images/s",
        ))

    def packed(model):
        def run(x2, ids2, x3):
            with torch.no_grad():
                return model.forward_packed([(x2, ids2), (x3, "C")])
        return run

    def make_packed(i):
        g = torch.Generator(device="cpu").manual_seed(100 + i)
        vol = torch.rand(b3, 1, 64, 64, 64, generator=g).to(device, dtype)
        return _images(b - b3, device, dtype, i), _ids(b - b3, device, i, True), vol

    cases.append(Case(
        suite="model", name=f"mosaic_infer_mixed2D3D_b{b}",
        params=dict(batch=b, batch_3d=b3, mixed=True, **{k: cfg[k] for k in ("embed_dim", "depth")}),
        make_inputs=make_packed,
        impls={"reference": packed(ref), "fast": packed(fast),
               **({"fast+graphs": CUDAGraphInference(lambda x2, ids2, x3: fast.forward_packed([(x2, ids2), (x3, "C")]))}
                  if graphs else {})},
        compile_reference=False,
        notes="reference runs the 2D and 3D batches one after the other; fast packs MLP + adapter",
    ))
    return cases


class TrainStep:
    """One MOSAIC training step: student fwd/bwd (CE + 0.1·MSE to the teacher CLS), AdamW (the trainer's:
    fused on CPU and CUDA, for reference and fast alike), EMA update.

    ``graphs``: the student's forward and backward replay CUDA graphs (:class:`CUDAGraphTraining`, one per
    routing letter, or one for per-sample ids), and so does the teacher's forward
    (:class:`CUDAGraphInference`, reading the EMA weights as updated in place); the loss, optimizer and
    EMA update stay eager. ``compile_model``: the student model under ``torch.compile``; ``compile_encoders``:
    the student's and teacher's encoders compiled in place (:meth:`MosaicModel.compile_encoder`, as
    ``mosaic-fast train --compile`` does)."""

    def __init__(self, model: MosaicModel, device: torch.device, dtype: torch.dtype, compile_model: bool = False,
                 graphs: bool = False, compile_encoders: bool = False):
        self.model = model.train()
        self.model.freeze_backbone(verbose=False)
        self.teacher = EMATeacher(model)
        if compile_encoders:  # what `mosaic-fast train --compile` runs
            for m in (self.model, self.teacher.model):
                m.compile_encoder()
        self.opt = build_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        self.specialist_params = specialist_parameters(model)
        self.forward = torch.compile(model) if compile_model else model
        self.graphed: dict[str, CUDAGraphTraining] | None = {} if graphs else None
        self.graphed_teacher: dict[str, CUDAGraphInference] = {}
        self.autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                         else contextlib.nullcontext())

    @staticmethod
    def _replayed(cache: dict, make, fn, x: torch.Tensor, ids: torch.Tensor | str):
        """``fn(x, ids)`` through the replay ``make(call)`` cached per routing: a letter is baked into the
        captured call, per-sample ids are a graph input."""
        key = ids if isinstance(ids, str) else "ids"
        replay = cache.get(key)
        if replay is None:
            call = (lambda x, e=ids: fn(x, e)) if isinstance(ids, str) else fn
            replay = cache[key] = make(call)
        return replay(x) if isinstance(ids, str) else replay(x, ids)

    def student(self, x: torch.Tensor, ids: torch.Tensor | str):
        """(features, logits) of the student, eager or replayed."""
        if self.graphed is None:
            return self.forward(x, task_id=0, expert_id=ids)
        return self._replayed(self.graphed, lambda call: CUDAGraphTraining(self.model, lambda m, *a: call(*a)),
                              lambda x, e: self.model(x, task_id=0, expert_id=e), x, ids)

    def teacher_features(self, x: torch.Tensor, ids: torch.Tensor | str) -> torch.Tensor:
        """The EMA teacher's CLS features (no grad), eager or replayed."""
        teacher = self.teacher.model
        if self.graphed is None:
            with torch.no_grad():
                return teacher(x, task_id=0, return_features=True, expert_id=ids)
        return self._replayed(self.graphed_teacher, CUDAGraphInference,
                              lambda x, e: teacher(x, task_id=0, return_features=True, expert_id=e), x, ids)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, experts: tuple[str, ...]) -> torch.Tensor:
        """One step; returns its loss (detached, no host sync)."""
        with self.autocast:
            feats, logits = self.student(x, ids)
            feats_t = self.teacher_features(x, ids)
            loss = F.cross_entropy(logits.float(), y) + 0.1 * F.mse_loss(feats.float(), feats_t.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        drop_absent_specialist_grads(self.specialist_params, set(experts))
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.teacher.update(self.model, experts)
        return loss.detach()

    def computed(self, *inputs) -> list[torch.Tensor]:
        """The gradients one step leaves, after clipping, on the trainable parameters other than the heads
        (the specialists' adapters, the 3D tokenizer; by name, zeros where the step left none), to
        compare implementations that start from the same weights. The loss and the heads' gradients (plain
        Linear layers in both models) are left out: larger than the adapters' gradients, they would hide
        an adapter computed wrongly in the relative difference."""
        self(*inputs)
        return [p.grad if p.grad is not None else torch.zeros_like(p)
                for name, p in sorted(self.model.named_parameters())
                if p.requires_grad and not name.startswith("heads.")]


def _agreement_steps(cfg: dict, device: torch.device, dtype: torch.dtype, labels: tuple[str, ...]) -> dict:
    """Fresh training steps of the timed columns ``labels``, all from the same weights, each computing one
    step (:meth:`TrainStep.computed`): the timed steps have updated their weights a different number of
    times, so their own calls cannot be compared. "compiled" is torch.compile of the reference, "fast+compiled"
    the fast model with its encoders compiled (``train --compile``), "kernel" the fast model on the fused
    kernels, "fast+graphs" the fast model replayed. The optimizer and EMA
    update are the same code for all (:class:`TrainStep`), not compared here."""
    ref, fast = _pair(cfg, device)
    twins = {"compiled": (ref, {"compile_model": True}), "fast+compiled": (fast, {"compile_encoders": True}),
             "kernel": (fast, {}), "fast+graphs": (fast, {"graphs": True})}
    built = {label: TrainStep(copy.deepcopy(model), device, dtype, **options).computed  # copies before any step
             for label, (model, options) in twins.items() if label in labels}
    if "kernel" in built:
        built["kernel"] = on_triton_backend(built["kernel"])
    return {"reference": TrainStep(ref, device, dtype).computed, "fast": TrainStep(fast, device, dtype).computed,
            **built}


def _resident_bytes(step: TrainStep) -> int:
    """Bytes a training setup keeps between steps: student and teacher weights/buffers, optimizer state and
    the fast modules' cached autocast casts of frozen weights."""
    tensors = [*step.model.parameters(), *step.model.buffers(), *step.teacher.model.parameters(),
               *step.teacher.model.buffers(), *cached_casts(step.model), *cached_casts(step.teacher.model)]
    tensors += [t for state in step.opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.is_cuda:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _graph_pool_segments() -> dict[int, int]:
    """Address -> size of every CUDA allocator segment owned by a private pool (CUDA graphs' memory)."""
    return {seg["address"]: seg["total_size"] for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)}


def _peak_memory(step: TrainStep, inputs: tuple, device: torch.device) -> int | str | None:
    """Peak CUDA memory of one training step on its own: the setup's resident bytes, the CUDA-graph pools
    the step created (a replayed step's activations and temporaries live there, reserved for the graphs:
    a replay allocates nothing, so ``max_memory_allocated`` does not see them), plus the step's peak above
    what was allocated before it (gradients, activations, temporaries). Other models alive in the
    benchmark process are not counted. Returns the error instead if the step fails."""
    if device.type != "cuda":
        return None
    try:
        pools_before = _graph_pool_segments()
        step(*inputs)  # optimizer state exists after a first step; a graphed step captures here
        step.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        torch.cuda.synchronize()
        pools = sum(size for address, size in _graph_pool_segments().items() if address not in pools_before)
    except Exception as exc:  # the timing run reports the same failure; keep the other implementations
        return f"{type(exc).__name__}: {exc}"[:300]
    return _resident_bytes(step) + pools + int(torch.cuda.max_memory_allocated()) - baseline


def training_cases(device: torch.device, dtype: torch.dtype, quick: bool, with_compile: bool = True,
                   graphs: bool = False) -> list[Case]:
    """Training steps of the reference, torch.compile(reference) (unless ``with_compile`` is False) and fast;
    on CUDA also the fast model with its student's and teacher's encoders compiled ("fast+compiled", what
    ``train --compile`` runs; with ``with_compile``) and, with ``graphs``, fast with its student
    forward+backward replayed as CUDA graphs ("fast+graphs")."""
    cfg = _config(quick)
    b = cfg["batch"]
    cases = []
    for mixed in (False, True):
        ref, fast = _pair(cfg, device)
        steps = {"reference": TrainStep(ref, device, dtype), "fast": TrainStep(fast, device, dtype)}
        if with_compile:
            steps["compiled"] = TrainStep(_pair(cfg, device)[0], device, dtype, compile_model=True)
            if device.type == "cuda":  # on CPU compile is the slower one (the fast model's oneDNN GEMMs are eager)
                steps["fast+compiled"] = TrainStep(_pair(cfg, device)[1], device, dtype, compile_encoders=True)
        if graphs and device.type == "cuda":
            steps["fast+graphs"] = TrainStep(_pair(cfg, device)[1], device, dtype, graphs=True)
        if device.type == "cuda" and not mixed:
            # "auto" runs one specialist on torch ops (cuBLAS); "kernel" times the fused kernels instead
            steps["kernel"] = on_triton_backend(steps["fast"])

        def make(i, mixed=mixed):
            g = torch.Generator(device="cpu").manual_seed(i)
            y = torch.randint(0, 9, (b,), generator=g).to(device)
            experts = ("A", "B") if mixed else ("A",)
            return _images(b, device, torch.float32, i), _ids(b, device, i, mixed), y, experts

        memory = {k: _peak_memory(s, make(0), device) for k, s in steps.items() if isinstance(s, TrainStep)}
        cases.append(Case(
            suite="model", name=f"mosaic_train_step_{'mixedAB' if mixed else 'single'}_b{b}",
            params=dict(batch=b, mixed=mixed, **{k: cfg[k] for k in ("embed_dim", "depth")}),
            make_inputs=make, impls=steps, compile_reference=False,
            agreement_impls=lambda labels=tuple(steps): _agreement_steps(cfg, device, dtype, labels),
            extra={"peak_memory_bytes": memory} if device.type == "cuda" else {},
            notes="student fwd+bwd + teacher fwd + AdamW + EMA; compiled = torch.compile(reference model)",
        ))
    return cases


def cases(device: torch.device, dtype: torch.dtype, quick: bool, graphs: bool = False,
          with_compile: bool = True) -> list[Case]:
    """Inference and training-step cases of MosaicModel."""
    return (inference_cases(device, dtype, quick, graphs, with_compile)
            + training_cases(device, dtype, quick, with_compile, graphs))
