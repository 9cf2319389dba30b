"""Teacher backbones behind one interface (`teachers.interface.Teacher`): tiny (embedded), dimple, dream, llada."""

from teachers.interface import TEACHERS, PrefixCache, Teacher, load_teacher, new_tiny_teacher, save_teacher

__all__ = ["TEACHERS", "PrefixCache", "Teacher", "load_teacher", "new_tiny_teacher", "save_teacher"]
