"""bigatlas: out-of-core scAtlasVAE training and inference. `from bigatlas import AtlasVAE`."""


def __getattr__(name):  # lazy: `bigatlas synth` should not pay for importing torch models
    if name == "AtlasVAE":
        from .api import AtlasVAE

        return AtlasVAE
    raise AttributeError(name)


__all__ = ["AtlasVAE"]
