"""dcn_plugin's GPU kernels: Triton, registered for the CUDA dispatch key by ``ops/_library.py``.

Imported only when an op runs on a CUDA tensor (or by the tests, under Triton's interpreter):
``import dcn_plugin`` and the CPU op never need triton.

Design: sampling kernels feeding matrix products (``driver.py`` + ``kernels.py``), the same
algebra as the C++ CPU driver, rather than implicit-GEMM kernels that gather samples straight
into ``tl.dot`` tiles. Implicit GEMM saves the column buffer's memory traffic and is the likelier
route to higher bf16 speed, but it needs per-GPU tuning of tile shapes, pipelining
and split reductions for the weight and offset gradients, which cannot be done without a GPU to
measure on; this project has none yet. The sampling route is correct by construction from
pieces that are each simple to check under the interpreter (one gather/scatter kernel, and
``torch.bmm``, which is cuBLAS), and keeps one algebra and one dtype policy for both devices.
Implicit GEMM can replace the sampling + matmul of the forward later, behind the same driver
functions, once a GPU run says where the time goes.

The deformable RoI pooling ops have one kernel of their own (``roi_pool.py``): a program pools one
bin of one RoI for a tile of channels, with no matrix product to feed.
"""

from .driver import deform_conv, deform_conv_backward

__all__ = ["deform_conv", "deform_conv_backward"]
