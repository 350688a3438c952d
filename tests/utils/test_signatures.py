"""init_parameters: the options a class accepts, followed up the class tree through **kwargs."""

import inspect

from ssl_zoo.utils.signatures import init_parameters


class Root:
    def __init__(self, hidden: int = 0) -> None:
        self.hidden = hidden


class Base(Root):
    def __init__(self, size: int = 224, *, name: str = "base") -> None:  # no **kwargs: Root's options end here
        super().__init__()
        self.size, self.name = size, name


class Child(Base):
    def __init__(self, depth: int = 2, size: int = 32, **kwargs) -> None:
        super().__init__(size=size, **kwargs)
        self.depth = depth


class Grandchild(Child):  # no __init__ of its own
    pass


def test_most_derived_declaration_wins_and_the_walk_stops_without_kwargs():
    params = init_parameters(Grandchild)
    assert list(params) == ["depth", "size", "name"]  # Root's 'hidden' is not reachable from Child
    assert params["size"].default == 32 and params["name"].default == "base"
    Grandchild(depth=1, size=8, name="x")  # every reported option is accepted


def test_variadic_and_self_are_not_options():
    assert "kwargs" not in init_parameters(Child) and "self" not in init_parameters(Child)
    assert init_parameters(Base)["size"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_cli_and_evaluation_read_the_same_tree():
    from ssl_zoo.cli.errors import accepted_options
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.eval.module import _declared_default

    options = accepted_options("ssl_zoo.data.ImageFolderDataModule")
    assert "eval_size" in options and "root" in options
    assert accepted_options("ssl_zoo.data.NoSuchDataModule") == accepted_options("ssl_zoo.no_such_room.X") == []
    assert _declared_default(ImageFolderDataModule, "eval_size") == init_parameters(ImageFolderDataModule)[
        "eval_size"].default
    assert _declared_default(ImageFolderDataModule, "no_such_option") is inspect.Parameter.empty
