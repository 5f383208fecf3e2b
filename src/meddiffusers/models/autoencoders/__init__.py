from .loading import load_vq_model
from .slab_decoding import SlabDecoder
from .vector_quantizer_3d import VectorQuantizer3D, VectorQuantizer3DOutput
from .vq_model_3d import VQModel3D, VQModel3DEncoderOutput
