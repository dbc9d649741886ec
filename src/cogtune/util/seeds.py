"""The range of seeds: they go to torch.Generator.manual_seed and numpy, which take less than this safely."""

SEED_LIMIT = 2**63
