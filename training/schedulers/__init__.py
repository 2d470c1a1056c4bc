"""Diffusion samplers, one per file (DDPM ancestral, DDIM), the beta schedule they share, and a
small batch helper with classifier-free guidance (`pipeline.py`)."""
