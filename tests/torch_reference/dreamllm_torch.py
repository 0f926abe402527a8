"""A PyTorch oracle of the full DreamLLM training forward and loss (spec 1.1-1.3), for parity tests.

Built only from transformers / diffusers modules plus `nn.Linear` projectors and an `nn.Parameter` of
dream queries, and written with plain Python loops: clarity over speed. Module names reproduce
upstream's in-model layout (spec 5.2), so `state_dict()` has the keys of a released checkpoint:

    model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*           transformers LLaMA
    model.clip_vision_embedding.clip_vision_model.vision_model.*               transformers CLIP vision
    model.clip_vision_embedding.projector.projector.{weight,bias}              visual projector
    model.dream_embedding.dream_queries                                        [1, Q, D]
    stable_diffusion_head.{unet,vae}.*                                         diffusers
    stable_diffusion_head.projector.projector.weight                           condition projector

Semantics (upstream `DreamLLMModel.forward` + `DreamLLMForCausalMLM.forward`, with dreamjax's per-sample
image assignment of the batch contract, DESIGN section 3):

1. Embed the ids. After every `<dream_start>` at p, positions p+1 .. p+Q take `dream_queries[0]`.
2. The k-th `<im_start>` of sample b at p takes image `images[b][k]`: CLIP `hidden_states[select_layer]`
   without the CLS token, through the visual projector, written into p+1 .. p+N. A missing image
   (`None`, or k past the list) leaves the `<im_patch>` embeddings in place.
3. Causal LLaMA with the padding mask; final-norm hidden states -> `lm_head` -> logits (fp32).
4. lm_loss: shifted cross-entropy, mean over all valid (!= -100) targets of the whole batch; 0 if none.
5. The k-th `<dream_start>` of sample b with an output image `images_dm[b][k]` reads the final-norm
   hidden states at p+1 .. p+Q -> condition projector -> `encoder_hidden_states` [Q, C].
6. vm_loss: latents = (VAE posterior mean + std * latent_noise) * scaling_factor (pixels when there
   is no VAE), noisy = DDPMScheduler.add_noise(latents, noise, t), MSE(unet(noisy, t, cond), target)
   averaged over all elements of all present images (= the mean of per-image means; 0 if none).
   The random draws (t, noise, latent_noise) are passed in, so a test can share them with JAX.
7. loss = loss_weight_lm * lm_loss + loss_weight_vm * vm_loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

IGNORE_INDEX = -100


@dataclasses.dataclass
class OutputImage:
    """An image to generate, with the diffusion draws that go with it (all NCHW / CHW tensors)."""

    pixels: torch.Tensor  # [3, R, R] in [-1, 1]
    timestep: int
    noise: torch.Tensor  # [c, h, w]: the shape of the diffusion sample (latents, or pixels without a VAE)
    latent_noise: torch.Tensor | None = None  # [c, h, w]: the posterior sample's noise (VAE only)


class LinearProjector(nn.Module):
    """Upstream `LinearProjector`: the `nn.Linear` sits in `.projector` (hence `projector.projector.*`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.projector = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)


class _VisionModelHolder(nn.Module):
    """transformers 5 `CLIPVisionModel` has no `.vision_model` level any more; upstream (transformers 4.35)
    keys do, so the tower sits one level down to keep `clip_vision_model.vision_model.*` names."""

    def __init__(self, config: transformers.CLIPVisionConfig):
        super().__init__()
        self.vision_model = transformers.CLIPVisionModel(config)


class CLIPVisionEmbedding(nn.Module):
    def __init__(self, config: transformers.CLIPVisionConfig, embed_hidden_size: int, select_layer: int = -2):
        super().__init__()
        self.clip_vision_model = _VisionModelHolder(config)
        self.projector = LinearProjector(config.hidden_size, embed_hidden_size, bias=True)
        self.select_layer = select_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] CLIP-normalised -> [N, num_patches, D]."""
        out = self.clip_vision_model.vision_model(pixel_values=images, output_hidden_states=True)
        features = out.hidden_states[self.select_layer][:, 1:]  # the CLS token is dropped
        return self.projector(features)


class DreamEmbedding(nn.Module):
    def __init__(self, num_dream_queries: int, embed_hidden_size: int):
        super().__init__()
        self.dream_queries = nn.Parameter(torch.randn(1, num_dream_queries, embed_hidden_size) * 0.02)


class StableDiffusionHead(nn.Module):
    def __init__(self, unet_config: dict, vae_config: dict | None, scheduler_config: dict, embed_hidden_size: int):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(_strip(unet_config))
        self.vae = AutoencoderKL.from_config(_strip(vae_config)) if vae_config is not None else None
        self.projector = LinearProjector(embed_hidden_size, self.unet.config.cross_attention_dim, bias=False)
        # DDPMScheduler does not know DDIM/PNDM-only keys; from_config would only warn about them.
        self.scheduler = DDPMScheduler.from_config(
            {k: v for k, v in scheduler_config.items() if k not in ("set_alpha_to_one", "skip_prk_steps")})

    def latents(self, pixels: torch.Tensor, latent_noise: torch.Tensor | None) -> torch.Tensor:
        """[M, 3, R, R] in [-1, 1] -> the diffusion sample: a posterior sample * scaling factor, or pixels."""
        if self.vae is None:
            return pixels
        posterior = self.vae.encode(pixels).latent_dist  # latent_dist.sample() with the given noise:
        return (posterior.mean + posterior.std * latent_noise) * self.vae.config.scaling_factor

    def forward(self, pixels, encoder_hidden_states, timesteps, noise, latent_noise) -> torch.Tensor:
        """The diffusion loss (a scalar) of M images: pixels [M, 3, R, R], encoder_hidden_states [M, Q, D]."""
        latents = self.latents(pixels, latent_noise)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        cond = self.projector(encoder_hidden_states)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class DreamLLMForCausalMLM(nn.Module):
    """The oracle. `tokens` maps "im_start", "dream_start" to ids (read from the tokenizer)."""

    def __init__(
        self,
        llama_config: transformers.LlamaConfig,
        clip_config: transformers.CLIPVisionConfig,
        unet_config: dict,
        vae_config: dict | None,
        scheduler_config: dict,
        tokens: dict[str, int],
        num_dream_queries: int = 64,
        select_layer: int = -2,
        loss_weight_lm: float = 1.0,
        loss_weight_vm: float = 10.0,
    ):
        super().__init__()
        llm = transformers.LlamaForCausalLM(llama_config)
        d = llama_config.hidden_size
        self.model = llm.model  # LlamaModel: embed_tokens, layers, norm (+ the two embedding plugins below)
        self.lm_head = llm.lm_head
        self.model.clip_vision_embedding = CLIPVisionEmbedding(clip_config, d, select_layer)
        self.model.dream_embedding = DreamEmbedding(num_dream_queries, d)
        self.stable_diffusion_head = StableDiffusionHead(unet_config, vae_config, scheduler_config, d)
        self.im_start = tokens["im_start"]
        self.dream_start = tokens["dream_start"]
        self.num_dream_queries = num_dream_queries
        self.num_image_tokens = (clip_config.image_size // clip_config.patch_size) ** 2
        self.loss_weight_lm = loss_weight_lm
        self.loss_weight_vm = loss_weight_vm

    @staticmethod
    def _starts(ids: torch.Tensor, token: int) -> list[int]:
        return [p for p in range(ids.shape[0]) if int(ids[p]) == token]

    def embed(self, input_ids: torch.Tensor, images: list[list[torch.Tensor | None]]) -> torch.Tensor:
        """Token embeddings with dream queries and projected CLIP features written in (steps 1-2)."""
        batch, length = input_ids.shape
        x = self.model.embed_tokens(input_ids).clone()  # [B, L, D]

        queries = self.model.dream_embedding.dream_queries[0]  # [Q, D]
        for b in range(batch):
            for p in self._starts(input_ids[b], self.dream_start):
                n = min(self.num_dream_queries, length - p - 1)
                x[b, p + 1 : p + 1 + n] = queries[:n]

        slots, pixels = [], []  # (b, p) of every <im_start> that has an image, and the images
        for b in range(batch):
            for k, p in enumerate(self._starts(input_ids[b], self.im_start)):
                image = images[b][k] if k < len(images[b]) else None
                if image is not None:
                    slots.append((b, p))
                    pixels.append(image)
        if pixels:
            features = self.model.clip_vision_embedding(torch.stack(pixels))  # [M, N, D]
            for (b, p), f in zip(slots, features):
                n = min(self.num_image_tokens, length - p - 1)
                x[b, p + 1 : p + 1 + n] = f[:n].to(x.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        images: list[list[torch.Tensor | None]],
        images_dm: list[list[OutputImage | None]],
    ) -> dict:
        """input_ids, attention_mask, labels [B, L]; images[b][k]: the k-th input image of sample b
        ([3, H, W] or None); images_dm[b][k]: its k-th output image (OutputImage or None).

        Returns logits [B, L, V] (fp32), condition [M, Q, C] and condition_slots [(b, k)] of the M present
        output images (in batch order), lm_loss, vm_loss and loss.
        """
        x = self.embed(input_ids, images)
        hidden = self.model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state  # final norm
        logits = self.lm_head(hidden).float()

        # lm_loss: token mean over the whole batch.
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
        n_targets = int((shift_labels != IGNORE_INDEX).sum())
        lm_loss = ce.sum() / n_targets if n_targets > 0 else ce.sum() * 0.0

        # Conditions of the present output images, in batch order.
        q = self.num_dream_queries
        slots, states, items = [], [], []
        for b in range(input_ids.shape[0]):
            for k, p in enumerate(self._starts(input_ids[b], self.dream_start)):
                item = images_dm[b][k] if k < len(images_dm[b]) else None
                if item is None:
                    continue
                slots.append((b, k))
                states.append(hidden[b, p + 1 : p + 1 + q])
                items.append(item)

        head = self.stable_diffusion_head
        if items:
            encoder_hidden_states = torch.stack(states)  # [M, Q, D]
            condition = head.projector(encoder_hidden_states)  # [M, Q, C], what the UNet sees
            vm_loss = head(
                torch.stack([it.pixels for it in items]),
                encoder_hidden_states,
                torch.tensor([it.timestep for it in items], dtype=torch.long),
                torch.stack([it.noise for it in items]),
                torch.stack([it.latent_noise for it in items]) if head.vae is not None else None,
            )
        else:
            condition = logits.new_zeros((0, q, head.unet.config.cross_attention_dim))
            vm_loss = logits.new_zeros(())

        loss = self.loss_weight_lm * lm_loss + self.loss_weight_vm * vm_loss
        return {"logits": logits, "condition": condition, "condition_slots": slots, "lm_loss": lm_loss,
                "vm_loss": vm_loss, "loss": loss}
