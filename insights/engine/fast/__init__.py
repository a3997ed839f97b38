"""The speed machinery behind the engine's seam: the twin, CUDA graphs, fused bf16 copies, CPU slices."""
