"""prefixkv: PrefixKV-compressed KV caches for Hugging Face decoder LLMs, from calibration to Triton.

    from prefixkv import load_model, PrefixKVCache, RetentionProfile
    model, tokenizer = load_model("smollm2-135m")
    profile = RetentionProfile.load("profile.json")
    model.generate(ids, past_key_values=PrefixKVCache(profile, keep_fraction=0.2))
"""
__version__ = "0.1.0"

from .attention import enable
from .cache import PrefixKVCache
from .models import load_model
from .profile import ProfileError, RetentionProfile
from .search import prefix_search

__all__ = ["PrefixKVCache", "RetentionProfile", "ProfileError", "enable", "load_model", "prefix_search", "__version__"]
