"""Deviceless compiles for named targets: the targets, the compile pool and its worker, the compilers' figures,
the compile-only search and what the device search learns from it."""
