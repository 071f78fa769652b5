"""The generated image+text world of the default run: scenes, prompts, files, and the alignment check."""
from shapeworld.dataset import (
                                  EVAL_FILE,
                                  TRAIN_FILE,
                                  WORLD_FILE,
                                  WorldConfig,
                                  load_world_config,
                                  make_splits,
                                  world_token_format,
                                  world_tokenizer,
                                  write_world,
)
from shapeworld.scene import EOS, SHAPES, ImageParse, Obj, Scene, TextParse, WorldSpec, make_scene, scene_key
from shapeworld.tasks import Example, Partial, PromptError, follows, mismatched_description, sample_example

__all__ = ["EOS", "SHAPES", "EVAL_FILE", "TRAIN_FILE", "WORLD_FILE", "Example", "ImageParse", "Obj", "Partial",
           "PromptError", "Scene", "TextParse", "WorldConfig", "WorldSpec", "follows", "load_world_config",
           "make_scene", "make_splits", "mismatched_description", "sample_example", "scene_key", "world_token_format", "world_tokenizer",
           "write_world"]
