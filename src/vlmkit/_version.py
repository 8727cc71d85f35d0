"""The version of vlmkit, in a module of its own: every module that needs it imports it from here, never from
the ``vlmkit`` package face (which would tie the importer to the package's own imports: an import circle)."""

__version__ = "0.1.0"
