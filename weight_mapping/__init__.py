"""Map vLLM's live (fused) weight tensors onto a transformers model, as views."""

from weight_mapping.export_reader import Export, attach, wait_for_manifest
from weight_mapping.families import (
    FAMILIES,
    WRAPPERS,
    Family,
    Fusion,
    checkpoint_file_names,
    family_for,
    fuse_state_dict,
    hf_text_name,
    text_model_part,
)
from weight_mapping.mapping import UnmappedParameterError, build_model, load_config, shares_storage

__all__ = [
    "FAMILIES", "WRAPPERS", "Export", "Family", "Fusion", "UnmappedParameterError", "attach",
    "build_model", "checkpoint_file_names", "family_for", "fuse_state_dict", "hf_text_name",
    "load_config", "shares_storage", "text_model_part", "wait_for_manifest",
]
