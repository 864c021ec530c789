"""One module per competition; importing this package registers them all.

To add a competition, drop a module here that calls
``pipeline.competition.register(Competition(...))``: nothing in pipeline/
changes.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
