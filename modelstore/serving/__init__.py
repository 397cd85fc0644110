"""Serving: transformers models of tasks, resident models switched between tasks in place,
modules' tensors, and export to HF / PEFT directories."""
