"""How much to cut where: the allocation space and its exact budget projection, dense statistics,
allocation plans, the held-out proxy and the variant database. The methods (CFSP, FLAP, BlockPruner,
SPRINT, Bonsai, stitched FASP) and search/ both use them, so they live in runtime."""
