"""The instrumentation layer: code artefacts on pages (``ir``, ``manager``), call events
in ring pages (``calls``), ``@tracked`` objects (``tracked``) and the provenance of
propagated deltas (``provenance``). Public names are re-exported by ``mmsb``."""
