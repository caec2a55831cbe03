"""Static time models: predict a compiled kernel's run time from the compiler's own low-level output."""
