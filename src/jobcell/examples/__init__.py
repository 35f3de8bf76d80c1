"""Example runners and the demo pipeline."""
