"""Command-line flags of the tiny MOSAIC model the CLI tests train and evaluate (width 32, one block, 28² images
and volumes), shared so that every test file builds the same model."""

#: The model: ViT width, depth, heads, image/volume sizes and patches, and the three adapter bottlenecks.
TINY_MODEL = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--img_size_2d", "28", "--patch_size_2d", "7",
              "--img_size_3d", "28", "--patch_size_3d", "14", "--adapter_bottleneck_a", "8",
              "--adapter_bottleneck_b", "8", "--adapter_bottleneck_c", "16"]  # fmt: skip
#: Its training and evaluation batch sizes.
TINY_BATCHES = ["--batch_size", "8", "--eval_batch_size", "16"]
