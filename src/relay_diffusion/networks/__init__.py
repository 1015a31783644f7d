"""Networks: EDM's layers, the DDPM++/NCSN++ (``SongUNet``) and ADM (``DhariwalUNet``) U-Nets, and the
preconditioning wrappers (EDM, VP, VE, iDDPM) with the reference's parameter names and shapes."""
