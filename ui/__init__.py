"""Gradio tabs. Each module has build(services) and plain module-level handlers."""
