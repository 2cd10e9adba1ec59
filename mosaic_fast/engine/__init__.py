"""Training and evaluation engine for MOSAIC on MedMNIST."""
