"""Linear attribute heads on normalised z_sem (paper §5.3, §5.6; Appendix A.2, E, G)."""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .checks import check_vector_batch
from .statistics import ZSemStatisticsMixin


# Official `CelebAttrDataset.id_to_cls` order of the 40 CelebA-HQ attributes of the released `*_cls` heads.
CELEBAHQ_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
]  # fmt: skip


@dataclass
class AttributeClassifierOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(B, K)`): one output per attribute: a logit for binary attributes, the
            regressed value for continuous ones.
    """

    logits: torch.Tensor


class AttributeClassifier(ModelMixin, ConfigMixin, ZSemStatisticsMixin):
    r"""
    `K` linear heads `w_k . z_n + b_k` on the normalised semantic code `z_n = (z_sem - mean) / std` (official
    `ClsModel`). It stores the statistics it was trained with and the name and kind of every output.

    Parameters:
        num_channels (`int`, defaults to 512): width of z_sem.
        attribute_names (`List[str]`, *optional*): one name per output; the 40 CelebA-HQ attributes when `None`.
        attribute_types (`List[str]`, *optional*): `"binary"` (logistic) or `"continuous"` (regression) per
            output; all binary when `None`.
        target_logits (`List[float]`, *optional*): per output, the logit that edits aim for by default (the paper's
            Eq. 11 uses the median logit of the real positive images); `None` entries mean unknown.
    """

    _keep_in_fp32_modules = ["z_sem_mean", "z_sem_std"]  # float32 under `torch_dtype=`
    main_input_name = "z_sem"

    @register_to_config
    def __init__(
        self,
        num_channels: int = 512,
        attribute_names: Optional[List[str]] = None,
        attribute_types: Optional[List[str]] = None,
        target_logits: Optional[List[Optional[float]]] = None,
    ):
        super().__init__()
        names = list(attribute_names) if attribute_names is not None else list(CELEBAHQ_ATTRIBUTES)
        if len(set(names)) != len(names) or not names:
            raise ValueError("attribute_names must be a non-empty list of unique names")
        types = list(attribute_types) if attribute_types is not None else ["binary"] * len(names)
        if len(types) != len(names) or any(t not in ("binary", "continuous") for t in types):
            raise ValueError("attribute_types must give 'binary' or 'continuous' for every attribute")
        if target_logits is not None and len(target_logits) != len(names):
            raise ValueError("target_logits must have one entry per attribute")
        self.linear = nn.Linear(num_channels, len(names))
        self._register_z_sem_statistics(num_channels)

    @property
    def attribute_names(self) -> List[str]:
        names = self.config.attribute_names
        return list(names) if names is not None else list(CELEBAHQ_ATTRIBUTES)

    def attribute_index(self, attribute: Union[str, int]) -> int:
        """Index of an attribute given by name or index; raises a `ValueError` naming the known attributes."""
        names = self.attribute_names
        if isinstance(attribute, int) and not isinstance(attribute, bool):
            if not 0 <= attribute < len(names):
                raise ValueError(f"attribute index {attribute} out of range (0..{len(names) - 1})")
            return attribute
        if attribute not in names:
            raise ValueError(f"unknown attribute {attribute!r}; this classifier knows: {', '.join(names)}")
        return names.index(attribute)

    def attribute_type(self, attribute: Union[str, int]) -> str:
        types = self.config.attribute_types
        return "binary" if types is None else types[self.attribute_index(attribute)]

    def direction(self, attribute: Union[str, int]) -> torch.Tensor:
        """The (D,) weight vector `w` of an attribute, in normalised z_sem space."""
        return self.linear.weight[self.attribute_index(attribute)]

    def forward(
        self, z_sem: torch.Tensor, normalized: bool = False, return_dict: bool = True
    ) -> Union[AttributeClassifierOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            z_sem (`torch.Tensor` of shape `(B, D)`): semantic codes (raw, or normalised with `normalized=True`).
            normalized (`bool`): whether `z_sem` is already normalised with this model's statistics.

        Returns:
            [`AttributeClassifierOutput`] or `(logits,)` with logits of shape `(B, K)`.
        """
        check_vector_batch(z_sem, "z_sem", self.config.num_channels)
        z_n = z_sem if normalized else self.normalize_z_sem(z_sem)
        logits = self.linear(z_n.to(self.dtype))  # the compute dtype, also under layerwise casting
        if not return_dict:
            return (logits,)
        return AttributeClassifierOutput(logits=logits)
