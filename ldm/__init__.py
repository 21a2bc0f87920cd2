"""ldm: a latent diffusion (Stable-Diffusion-style) toolkit.

Stages: `ldm.train.vae.train_vae` (KL-VAE), `ldm.train.encode.encode_dataset` (latent cache),
`ldm.train.ldm.train_ldm` (text-conditioned U-Net), `ldm.train.distill.distill` (a 1-4 step LCM student
of a trained pipeline); sampling with `load_pipeline` + `generate`.
"""

__version__ = "0.1.0"


def load_pipeline(*args, **kwargs):
    """See `ldm.infer.load_pipeline`."""
    from ldm.infer import load_pipeline as _load

    return _load(*args, **kwargs)


def generate(*args, **kwargs):
    """See `ldm.infer.generate`."""
    from ldm.infer import generate as _generate

    return _generate(*args, **kwargs)
