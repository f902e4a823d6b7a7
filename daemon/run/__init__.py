"""The composition root: the only package that imports tasks, outer syncs, data sources,
the uploader and the API together. ``catalog.py`` registers the parts and loads the
config; ``build.py`` makes a finished run of them; ``runner.py`` is ``minerd run``.

Nothing below imports this package. Its ``__init__`` imports nothing, so that loading
the catalog (``minerd config validate``) does not load torch.
"""
