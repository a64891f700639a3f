"""The FoB prompt generator (fob_method.md 3-8) in pieces.

config.py     FoBConfig, every hyper-parameter, stored in checkpoints
ring.py       BPPC ring sampler `ring_points(mask, n_points, k_out, k_in)` (numpy/OpenCV)
heatmaps.py   Gaussian point heatmaps, heatmap-weighted masked average pooling
encoders.py   'lite' and 'resnet101' encoders behind one interface
bppc.py       support prototypes (background ring, foreground, RAC inner band)
bcm.py        background-centric context modelling (coarse P_fg, matching, masked attention, head)
spr.py        structure-guided prompt refinement (graph, context attention, deformable steps)
losses.py     L_heat, L_coor, L_fore, L_rac and the total
generator.py  FoBPromptGenerator: predict / predict_batch / encode_support, forward + compute_losses
"""
