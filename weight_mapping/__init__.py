"""Map vLLM's live (fused) weight tensors onto a transformers model, as views."""

from weight_mapping.export_reader import Export, attach, wait_for_manifest
from weight_mapping.families import FAMILIES, Family, Fusion, family_for, fuse_state_dict
from weight_mapping.mapping import UnmappedParameterError, build_model, load_config, shares_storage

__all__ = [
    "FAMILIES", "Export", "Family", "Fusion", "UnmappedParameterError", "attach",
    "build_model", "family_for", "fuse_state_dict", "load_config", "shares_storage",
    "wait_for_manifest",
]
