"""The search: one problem's loop, the Optuna study every worker shares, the final re-timing and store, and the
scheduler that hands a shapes list to several workers."""
