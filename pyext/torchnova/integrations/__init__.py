"""Drop-in adapters for third-party model libraries (one module per library, each imported lazily).

    torchnova.integrations.video_diffusion_pytorch   patch(model) / unpatch(model) for lucidrains' Unet3D
    torchnova.integrations.diffusers                 patch(module) / unpatch(module) for diffusers' video UNets
"""
