"""Model suite, DynaMer part (the paper's Table 7 format): inference time per batch against ρ.

CUDA: two ViT-B/16 backbones, batch 32 at 224², ρ ∈ {1, .5, .3, .1}, ``skip_mode`` "adapter" and
"block", reference (``fast=False``) vs fast (``fast=True``). CPU (quick): embed 192, depth 4, 224² images,
patch 16, batch 4 (smaller models are all per-op overhead and say nothing about skipping). Models are
built on first use (four ViT-B backbones per mode are large) and shared by the ρ cases of a mode;
``rho`` and ``skip_mode`` are in ``params`` so the runner can plot time vs ρ.
Targets (GPU, bf16): block mode at ρ = .5 ≤ 0.6× its ρ = 1 time; fast ≥ 2× reference at ρ = 1.
"""

from __future__ import annotations

import torch

from mosaic_fast.bench.core import Case
from mosaic_fast.graphs import CUDAGraphInference
from mosaic_fast.models import DynaMerModel

RHOS = (1.0, 0.5, 0.3, 0.1)
SKIP_MODES = ("adapter", "block")


def _config(quick: bool) -> dict:
    if quick:
        return dict(model=dict(img_size=224, patch_size=16, embed_dim=192, depth=4, num_heads=3), batch=4)
    return dict(model=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), batch=32)


class _LazyPair:
    """Reference and fast DynaMer models with the same random weights, built on first use."""

    def __init__(self, cfg: dict, skip_mode: str, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.skip_mode, self.device, self.dtype = cfg, skip_mode, device, dtype
        self.models: dict[str, DynaMerModel] = {}

    def get(self, which: str) -> DynaMerModel:
        if not self.models:
            ref = DynaMerModel(10, skip_mode=self.skip_mode, fast=False, **self.cfg["model"])
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    if name.startswith("adapters."):  # non-trivial experts and gates
                        p.normal_(0.0, 0.02)
            fast = DynaMerModel(10, skip_mode=self.skip_mode, fast=True, **self.cfg["model"])
            fast.load_state_dict(ref.state_dict())
            self.models = {"reference": ref.to(self.device, self.dtype).eval(),
                           "fast": fast.to(self.device, self.dtype).eval()}
        return self.models[which]


#: ρ of the block-mode cases that also time ``torch.compile`` of the reference ("compiled") and of the fast
#: model ("fast+compiled"), on CUDA: each ρ is a compile of two backbones, too slow for every case.
COMPILED_RHOS = (1.0, 0.5)


def _compiled_fast(pair: _LazyPair, rho: float):
    """``torch.compile`` of the fast model at this ρ, built on first use ("fast+compiled": Inductor fuses
    the routers' and blocks' small elementwise kernels, which bound the model at small ρ)."""
    state: dict = {}

    def run(x):
        model = pair.get("fast")
        model.keep_ratio = rho
        if "fn" not in state:
            state["fn"] = torch.compile(model)
        with torch.no_grad():
            return state["fn"](x)

    return run


def cases(device: torch.device, dtype: torch.dtype, quick: bool, graphs: bool = False,
          with_compile: bool = True) -> list[Case]:
    """Table-7 cases; with ``graphs`` also both models under CUDA-graph replay ("…+graphs" columns); on CUDA
    with ``with_compile``, block mode at ρ in COMPILED_RHOS also ``torch.compile`` of both models."""
    cfg = _config(quick)
    size = cfg["model"]["img_size"]
    out = []
    for mode in SKIP_MODES:
        pair = _LazyPair(cfg, mode, device, dtype)
        for rho in RHOS:
            def impl(which, rho=rho, pair=pair):
                def run(x):
                    model = pair.get(which)
                    model.keep_ratio = rho
                    with torch.no_grad():
                        return model(x)
                return run

            def graphed(which, rho=rho, pair=pair):
                replay = CUDAGraphInference(lambda x: pair.get(which)(x))

                def run(x):
                    pair.get(which).keep_ratio = rho  # before the first call: the capture bakes ρ in
                    return replay(x)
                return run

            def make(i):
                g = torch.Generator().manual_seed(i)
                return [torch.randn(cfg["batch"], 3, size, size, generator=g).to(device, dtype)]

            params = dict(rho=rho, skip_mode=mode, batch=cfg["batch"], **cfg["model"])
            out.append(Case("model", f"dynamer_{mode}_rho{rho:g}", params, make,
                            {"reference": impl("reference"), "fast": impl("fast"),
                             **({"reference+graphs": graphed("reference"), "fast+graphs": graphed("fast")}
                                if graphs else {}),
                             **({"fast+compiled": _compiled_fast(pair, rho)}
                                if with_compile and device.type == "cuda" and mode == "block"
                                and rho in COMPILED_RHOS else {})},
                            compile_reference=device.type == "cuda" and mode == "block" and rho in COMPILED_RHOS,
                            notes="inference time per batch (Table 7 format); reference = fast=False model"))
    return out
