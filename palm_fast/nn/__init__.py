"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
