from .safe_unpickle import load_original_checkpoint
from .single_file import FromOriginalCheckpointMixin, KeyReport, load_original_model
