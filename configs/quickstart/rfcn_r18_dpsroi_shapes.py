# R-FCN with deformable position-sensitive RoI pooling (Deformable ConvNets).
_base_ = "./rfcn_r18_shapes.py"

model = dict(roi_head=dict(bbox_head=dict(no_trans=False)))
