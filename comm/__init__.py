"""Moving tensors between ranks: the device mesh, ring point-to-point and all-to-all.

Empty for now; the sequence-parallel work fills it (see ``shared/DESIGN.md``).
"""
