"""Generative models of galaxy images: the registry (`galaxygen.models.registry`) and every registered model.

Importing this package registers the models (`cnn`, `cnn3`, `mlp1`, `mlp2`, `resvae`, `dcgan`, `diffusion`);
each model module imports only the registry, so there is no import circle.
"""

from galaxygen.models import cnn, dcgan, diffusion, mlp, resvae  # noqa: F401  (registration)
from galaxygen.models.registry import (  # noqa: F401  (the public interface)
    MODELS,
    Family,
    ModelSpec,
    all_latents,
    autocast_args,
    build_model,
    generate,
    memory_format,
    register,
)
