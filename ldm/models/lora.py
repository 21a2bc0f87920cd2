"""LoRA fine-tuning of the U-Net (Hu et al. 2021): train rank-r updates W + (alpha / r) B A of
chosen linear layers, the rest frozen.

The adapters are peft's, attached through diffusers' `add_adapter`. They are saved twice: in
the file `StableDiffusionPipeline.load_lora_weights` reads, and in kohya's layout, which the web
UIs load. Two things the usual scripts leave out are kept here:

- alpha travels with the weights. The file's metadata holds the adapter's config, so a LoRA
  trained with alpha != r loads at its trained strength; a file without it would load at
  scale 1, which is what diffusers assumes when no alpha is given.
- the merged export folds the adapters into the float32 weights they were trained on (the frozen
  base is never cast), and then removes them, so the pipeline directory loads with no peft
  layers and gives what the adapted U-Net gave.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from ldm.config import require

ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


@dataclasses.dataclass
class LoRAConfig:
    rank: int = 0                  # 0: fine-tune every U-Net weight; r > 0: train rank-r adapters only
    alpha: float | None = None     # the update's scale is alpha / rank; None: alpha = rank (scale 1)
    dropout: float = 0.0           # dropout on the adapters' input
    targets: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # ^ linear layers by name suffix: the attention projections (diffusers' and kohya's default);
    #   add "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2" for every linear of the transformer blocks

    def validate(self) -> None:
        require(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}")
        require(self.alpha is None or self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(not self.rank or bool(self.targets), "lora.targets is empty: name the linear layers to adapt")

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


def add_lora(unet: UNet2DConditionModel, cfg: LoRAConfig) -> list[torch.nn.Parameter]:
    """Freeze the U-Net, attach rank-`cfg.rank` adapters to the target layers; the adapters' parameters.

    The B matrices start at zero, so the adapted U-Net starts as the pretrained one.
    """
    from peft import LoraConfig

    def named(name: str, target: str) -> bool:  # peft's rule: the whole name, or its last dotted parts
        return name == target or name.endswith("." + target)

    modules = dict(unet.named_modules())
    unfit = [t for t in cfg.targets
             if not any(named(n, t) for n in modules) or any(named(n, t) and not isinstance(m, torch.nn.Linear)
                                                              for n, m in modules.items())]
    if unfit:
        raise ValueError(f"lora.targets: {unfit} name no linear layer of this U-Net, or a layer that is not linear "
                         "(try to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2)")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                init_lora_weights="gaussian", target_modules=list(cfg.targets)), ADAPTER)
    return [p for p in unet.parameters() if p.requires_grad]


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same U-Net with each adapter folded into its layer, W + (alpha / r) B A, and the adapter
    layers removed (diffusers' `fuse_lora` and `unload_lora`): a plain U-Net again."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def save_lora(unet: UNet2DConditionModel, out_dir: Path, name: str) -> list[Path]:
    """The adapters twice in `out_dir`: as diffusers' `load_lora_weights` reads them (LORA_FILE, the
    adapter's config with alpha in the metadata), and in kohya's layout as `<name>.safetensors`,
    the file A1111, Forge and ComfyUI take in their LoRA folders."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
                                              safe_serialization=True)
    kohya = Path(out_dir) / f"{name}.safetensors"
    config = unet.peft_config[ADAPTER]
    save_file(kohya_state_dict(unet), kohya, metadata={"ss_network_module": "networks.lora",
                                                       "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)})
    return [Path(out_dir) / LORA_FILE, kohya]


def kohya_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """kohya's SD-1.x/2.x layout: `lora_unet_<diffusers module path, dots as underscores>` with
    `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`, the scale being alpha / rank."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            key = "lora_unet_" + name.replace(".", "_")
            rank = module.r[ADAPTER]
            out[f"{key}.lora_down.weight"] = module.lora_A[ADAPTER].weight.detach().float().contiguous()
            out[f"{key}.lora_up.weight"] = module.lora_B[ADAPTER].weight.detach().float().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(module.scaling[ADAPTER] * rank))
    return out
