# R-FCN with both: deformable convolution in c5 and deformable position-sensitive RoI pooling.
_base_ = "./rfcn_r18-dconv-c5_shapes.py"

model = dict(roi_head=dict(bbox_head=dict(no_trans=False)))
