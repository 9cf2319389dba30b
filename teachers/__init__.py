"""Teacher backbones behind one interface (`teachers.interface.Teacher`): LLaDA, Dream, Dimple (native classes)."""

from teachers.interface import BACKBONES, PrefixCache, Teacher, load_teacher, new_teacher, save_teacher

__all__ = ["BACKBONES", "PrefixCache", "Teacher", "load_teacher", "new_teacher", "save_teacher"]
