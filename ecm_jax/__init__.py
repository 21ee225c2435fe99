"""ecm-jax: EC-CaM-UNet (Xu et al., IEEE TNSE 2023) in JAX/Flax."""
