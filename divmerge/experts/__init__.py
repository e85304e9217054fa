"""Family-agnostic expert loading: sources, peft adapters, and the one loader loop."""
