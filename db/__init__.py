"""The autotuner's results database: runs, trials, best configs, runtime misses and worker claims.

Plain values only (no jax, no kernels): a `TuningKey` names what was tuned, a `Store` reads and writes one SQLite
file or PostgreSQL database (shared with Optuna's tables), and `export_document` / `import_document` move bests
between databases as JSON.
"""
from db.errors import (DatabaseError, ForeignDatabaseError, ImportValidationError, NotADatabaseError,
                       SchemaTooNewError)
from db.records import (DTYPES, IMPLEMENTATIONS, KERNEL_IMPLEMENTATION, PLATFORMS, RUN_STATUSES, TRIAL_STATUSES,
                        BestOffer, BestRecord, ConfigCheck, MissRecord, RunRecord, TrialRecord, TuningKey)
from db.schema import SCHEMA_VERSION
from db.store import Store
from db.transfer import export_document, import_document, read_document
from db.urls import default_url, resolve_url

__all__ = [
    "DTYPES", "IMPLEMENTATIONS", "KERNEL_IMPLEMENTATION", "PLATFORMS", "RUN_STATUSES", "SCHEMA_VERSION",
    "TRIAL_STATUSES", "BestOffer", "BestRecord",
    "ConfigCheck", "DatabaseError", "ForeignDatabaseError", "ImportValidationError", "MissRecord", "NotADatabaseError",
    "RunRecord", "SchemaTooNewError", "Store", "TrialRecord", "TuningKey", "default_url", "export_document",
    "import_document", "read_document", "resolve_url",
]
