"""Computation of Cosmos Policy: networks, checkpoint loaders, semantics, backends and modes."""
