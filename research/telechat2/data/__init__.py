"""Data preparation (`preprocess.py`: JSON lines -> packed MindRecord), the training loader (`loader.py`) and
the project's sample corpus (`samples.py`). MindSpore is imported only when a file is written or read."""


def __getattr__(name):
    if name in ("DataLoader", "create_loader", "LoaderError"):
        from . import loader
        return getattr(loader, name)
    if name in ("Options", "Summary", "PreprocessError", "run"):
        from . import preprocess
        return getattr(preprocess, name)
    raise AttributeError(name)


__all__ = ["DataLoader", "create_loader", "LoaderError", "Options", "Summary", "PreprocessError", "run"]
