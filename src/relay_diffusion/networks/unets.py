"""The U-Net backbones of EDM (docs/math.md §7): DDPM++ / NCSN++ (``SongUNet``) and ADM (``DhariwalUNet``).

Constructor arguments keep the reference names and defaults, because reference checkpoints are
rebuilt from their recorded init kwargs. Module names (``enc.16x16_block0`` ...) follow the reference
layouts so weights load by name. ``forward(x, noise_labels, class_labels, augment_labels=None)``:
``x [N, in_channels, H, W]``, ``noise_labels [N]``, ``class_labels [N, label_dim]`` or None (no label,
the same as an all-zero label), ``augment_labels [N, augment_dim]`` or None.

The only randomness inside a network is ``nn.Dropout``. ``label_dropout`` (classifier-free guidance
training) is stored, not applied: the loss drops labels with its own generators.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_resolution(img_resolution: int, levels: int) -> None:
    """Every level halves the resolution, so it must divide by ``2 ** (levels - 1)``."""
    if img_resolution < 1 or img_resolution % (1 << (levels - 1)):
        raise ValueError(f"img_resolution {img_resolution} must be a multiple of 2**{levels - 1} for {levels} levels")


def _init_kwargs(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``cls`` from its ``__init__``'s ``values`` (``locals()``), in signature order,
    sequences as lists, so that the dict is JSON and rebuilds the network."""
    names = [name for name in inspect.signature(cls).parameters if name != "self"]
    return {name: list(values[name]) if isinstance(values[name], (list, tuple)) else values[name] for name in names}


def _labels_or_zeros(class_labels: torch.Tensor | None, label_dim: int, emb: torch.Tensor) -> torch.Tensor:
    """``class_labels`` as ``[N, label_dim]`` in the embedding's dtype; None means "no label" (zeros)."""
    if class_labels is None:
        return emb.new_zeros(emb.shape[0], label_dim)
    return class_labels.to(emb.dtype).reshape(-1, label_dim)


def _swap_halves(emb: torch.Tensor) -> torch.Tensor:
    """``[N, 2K]`` laid out ``[cos, sin]`` -> ``[sin, cos]`` (DDPM++ / NCSN++ order)."""
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)


def _run_unet(enc: nn.ModuleDict, dec: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Encoder with skip connections, then the decoder concatenating them (no auxiliary paths)."""
    skips = []
    for block in enc.values():
        x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        skips.append(x)
    for block in dec.values():
        if x.shape[1] != block.in_channels:
            x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, emb)
    return x


def _open_encoder_level(
    enc: nn.ModuleDict, res: int, level: int, cout: int, conv_channels: int, block_kwargs: dict, init: dict
) -> int:
    """Level 0 opens with the input convolution ``{res}x{res}_conv`` (to ``conv_channels``), every other level
    with the downsampling block ``{res}x{res}_down``. Returns the channel count after it."""
    if level == 0:
        enc[f"{res}x{res}_conv"] = Conv2d(cout, conv_channels, 3, **init)
        return conv_channels
    enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
    return cout


def _add_level_blocks(
    blocks: nn.ModuleDict, res: int, cout: int, channels: int, attention: Sequence[bool], block_kwargs: dict,
    skips: list[int] | None = None,
) -> int:
    """Blocks ``{res}x{res}_block{idx}`` to ``channels``, one per entry of ``attention`` (whether it attends). In
    the decoder (``skips`` given) each block also takes the last encoder output left in ``skips``."""
    for idx, attn in enumerate(attention):
        cin = cout + (skips.pop() if skips is not None else 0)
        blocks[f"{res}x{res}_block{idx}"] = UNetBlock(cin, channels, attention=attn, **block_kwargs)
        cout = channels
    return cout


def _add_decoder_level(
    dec: nn.ModuleDict, res: int, lowest: bool, cout: int, channels: int, attention: Sequence[bool],
    block_kwargs: dict, skips: list[int],
) -> int:
    """A decoder level: ``{res}x{res}_in0`` (with attention) and ``_in1`` at the lowest level, else ``_up``; then
    the blocks of :func:`_add_level_blocks` taking the skip connections. Returns ``channels``."""
    if lowest:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
    else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
    return _add_level_blocks(dec, res, cout, channels, attention, block_kwargs, skips)


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as reimplemented by EDM. ``-> [N, out_channels, H, W]``."""

    def __init__(
        self,
        img_resolution: int,                    # image resolution at input/output
        in_channels: int,                       # number of colour channels at input
        out_channels: int,                      # number of colour channels at output
        label_dim: int = 0,                     # class label dimensionality; 0 = unconditional
        augment_dim: int = 0,                   # augmentation label dimensionality; 0 = none
        model_channels: int = 128,              # base channel count
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # channel multiplier per resolution
        channel_mult_emb: int = 4,              # embedding width = model_channels * this
        num_blocks: int = 4,                    # residual blocks per resolution
        attn_resolutions: Sequence[int] = (16,),  # resolutions with self-attention
        dropout: float = 0.10,                  # dropout probability of the residual blocks
        label_dropout: float = 0.0,             # stored for the loss; not applied here
        embedding_type: str = "positional",     # 'positional' (DDPM++) or 'fourier' (NCSN++)
        channel_mult_noise: int = 1,            # noise embedding width = model_channels * this
        encoder_type: str = "standard",         # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++)
        decoder_type: str = "standard",         # 'standard' or 'skip'
        resample_filter: Sequence[int] = (1, 1),  # FIR taps: [1,1] (DDPM++), [1,3,3,1] (NCSN++)
    ) -> None:
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.init_kwargs = _init_kwargs(SongUNet, locals())
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping: noise (+ label + augmentation) -> embedding [N, emb_channels].
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. ``aux`` carries the downsampled input image for the skip/residual encoders.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            cout = _open_encoder_level(self.enc, res, level, cout, model_channels, block_kwargs, init)
            if level > 0 and encoder_type == "skip":
                self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
            if level > 0 and encoder_type == "residual":
                self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                    caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                )
                caux = cout
            attention = [res in attn_resolutions] * num_blocks
            cout = _add_level_blocks(self.enc, res, cout, model_channels * mult, attention, block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder; with decoder_type 'skip' every level adds its RGB output to the upsampled sum.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res, lowest = img_resolution >> level, level == len(channel_mult) - 1
            attention = [False] * num_blocks + [res in attn_resolutions]  # the level's last block only
            cout = _add_decoder_level(self.dec, res, lowest, cout, model_channels * mult, attention, block_kwargs,
                                      skips)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Conditioning embedding ``[N, emb_channels]``."""
        emb = _swap_halves(self.map_noise(noise_labels))
        if self.map_label is not None:
            labels = _labels_or_zeros(class_labels, self.label_dim, emb)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux, tmp = None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as reimplemented by EDM. ``-> [N, out_channels, H, W]``."""

    def __init__(
        self,
        img_resolution: int,                    # image resolution at input/output
        in_channels: int,                       # number of colour channels at input
        out_channels: int,                      # number of colour channels at output
        label_dim: int = 0,                     # class label dimensionality; 0 = unconditional
        augment_dim: int = 0,                   # augmentation label dimensionality; 0 = none
        model_channels: int = 192,              # base channel count
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # channel multiplier per resolution
        channel_mult_emb: int = 4,              # embedding width = model_channels * this
        num_blocks: int = 3,                    # residual blocks per resolution
        attn_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
        dropout: float = 0.10,                  # dropout probability of the residual blocks
        label_dropout: float = 0.0,             # stored for the loss; not applied here
    ) -> None:
        _check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.init_kwargs = _init_kwargs(DhariwalUNet, locals())
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping: noise (+ augmentation) -> embedding, then + label.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            cout = _open_encoder_level(self.enc, res, level, cout, model_channels * mult, block_kwargs, init)
            attention = [res in attn_resolutions] * num_blocks
            cout = _add_level_blocks(self.enc, res, cout, model_channels * mult, attention, block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res, lowest = img_resolution >> level, level == len(channel_mult) - 1
            attention = [res in attn_resolutions] * (num_blocks + 1)
            cout = _add_decoder_level(self.dec, res, lowest, cout, model_channels * mult, attention, block_kwargs,
                                      skips)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Conditioning embedding ``[N, emb_channels]``."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_labels_or_zeros(class_labels, self.label_dim, emb))
        return F.silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x = _run_unet(self.enc, self.dec, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


NETWORKS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
