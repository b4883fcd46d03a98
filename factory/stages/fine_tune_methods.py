"""Fine-tune methods by name (`generation.finetune`): what the fine-tune of one identity trains,
and how the UNet goes back to the base model after it. A method is one `FineTuneMethod` class
registered once in `FINETUNE_METHODS`; the built-in ones are `full` (the paper's whole UNet,
restored from a copy of its base weights) and `lora` (a peft adapter, unloaded after each
identity). The fine-tune loop itself is `factory.stages.fine_tune`.

Importing this module imports no torch: the build's check phase (`factory.preflight`) asks the
registry which names exist before anything heavy loads, so torch is imported where it is used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from core.registry import Registry
from core.settings.stages import GenerationConfig

if TYPE_CHECKING:
    import torch

    from factory.stages.diffusion import DiffusionModel

LORA_ADAPTER = "identity"


class FineTuneMethod(ABC):
    """What a fine-tune trains and how the UNet goes back to the base model after each identity.
    One instance per loaded model, made once the model is in place."""

    # True where the base weights are never written (only an adapter trains): the frozen UNet
    # may then stay in the mixed-precision dtype for good (`DiffusionModel`'s half_precision_unet).
    frozen_base: bool = False

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model

    @staticmethod
    @abstractmethod
    def learning_rate(config: GenerationConfig) -> float: ...

    @abstractmethod
    def make_trainable(self) -> None:
        """Set `requires_grad` on what this method trains (adding it first where it is new)."""

    @abstractmethod
    def restore(self) -> None:
        """Back to the base model, bit-identical (after every identity, failed or not)."""

    def release_failed_try(self) -> None:  # noqa: B027 - optional hook
        """What a failed try may have left beyond gradients and flags (which the caller clears)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        from diffusers.training_utils import cast_training_params

        self.make_trainable()
        # peft creates the adapter in its base layer's dtype (half under mixed precision); the
        # optimizer needs fp32 weights. A no-op for parameters already in fp32.
        cast_training_params(self.model.unet)  # to fp32, its default
        return [p for p in self.model.unet.parameters() if p.requires_grad]


FINETUNE_METHODS: Registry[type[FineTuneMethod]] = Registry("fine-tune method", "generation.finetune")


@FINETUNE_METHODS.register("full")
class FullFineTune(FineTuneMethod):
    """The paper's: the whole UNet trains (fp32 master weights); its base weights come back from
    a copy taken at setup (`BaseWeightCopy`: pinned host memory beside a GPU, a local file on a
    CPU; never a reload of the model)."""

    def __init__(self, model: DiffusionModel) -> None:
        from factory.stages.base_weights import BaseWeightCopy

        super().__init__(model)
        self.base_copy = BaseWeightCopy(model.unet, model.device)

    @staticmethod
    def learning_rate(config: GenerationConfig) -> float:
        return config.learning_rate

    def make_trainable(self) -> None:
        self.model.unet.requires_grad_(True)

    def restore(self) -> None:
        self.base_copy.restore(self.model.unet)  # under torch.no_grad (BaseWeightCopy.restore's own)


@FINETUNE_METHODS.register("lora")
class LoraFineTune(FineTuneMethod):
    """A fresh peft adapter on the attention projections (`generation.lora`) per identity; the
    base weights stay frozen, so they stay bit-identical and no copy of them is kept."""

    frozen_base = True

    @staticmethod
    def learning_rate(config: GenerationConfig) -> float:
        return config.lora.learning_rate

    def make_trainable(self) -> None:
        from peft import LoraConfig

        self.model.unet.requires_grad_(False)
        lora = self.model.config.lora
        adapter = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                             init_lora_weights="gaussian")
        self.model.unet.add_adapter(adapter, adapter_name=LORA_ADAPTER)

    def restore(self) -> None:
        import torch

        if getattr(self.model.unet, "peft_config", None):
            # Removes the peft layers themselves (not only the adapter's weights), so the
            # UNet is again the base module tree with its untouched base weights.
            with torch.no_grad():
                self.model.unet.unload_lora()

    def release_failed_try(self) -> None:
        self.restore()  # drop an adapter the failed try left (a no-op without)
