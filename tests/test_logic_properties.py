"""Property-based test of the chat logic: arbitrary lines from several members
in several rooms never break its invariants."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatserver import Chat, Config, fold
from test_logic import receive

ROOMS = ["one", "two"]

any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
names = st.sampled_from(["alice", "Alice", "bob", "b\u202eob", "x" * 40, "", "zoë", "a b"])
lines = st.one_of(
    any_text,
    st.builds(lambda n: f"/nick {n}", st.one_of(names, any_text)),
    st.builds(lambda t: f"/me {t}", any_text),
    st.builds(lambda t: f"//{t}", any_text),
    st.sampled_from(["/who", "/help", "/nope", "/", "   ", "\x07", "x" * 120]),
)
actions = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["say", "join", "leave"]),
                             lines, names), min_size=1, max_size=60)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_chat_logic_keeps_its_invariants(steps):
    chat = Chat(Config(max_chars=100, rate=50, burst=5, crowd=3), clock=Clock())
    members = {}
    last_seq = {room: 0 for room in ROOMS}
    sender_of_line = {}  # (room, seq) -> name of the member who posted it

    def check_room(room_name):
        room = chat.rooms.get(room_name)
        if room is None:
            return
        room.take_presence()
        for data in room.take_pending():
            frame = json.loads(data)
            assert frame["room"] == room_name  # never a frame for another room
            assert frame["type"] in ("sys", "user") and isinstance(frame["message"], str)
            assert isinstance(frame["ts"], int)
            if frame["type"] == "user":
                assert frame["seq"] == last_seq[room_name] + 1  # strictly by one
                last_seq[room_name] = frame["seq"]
                assert frame["id"] == sender_of_line[(room_name, frame["seq"])]
        folded = [fold(name) for name in room.members]
        assert len(folded) == len(set(folded))  # names unique per room, any case
        assert all(fold(m.name) == key for key, m in room.members.items())

    for slot, verb, line, name in steps:
        member = members.get(slot)
        if verb == "join" or member is None:
            if member is not None:
                chat.leave(member)
            member, out = chat.join(ROOMS[slot % 2], name or None)
            members[slot] = member
        elif verb == "leave":
            chat.leave(member)
            del members[slot]
            member = None
        else:
            before = member.room.seq
            name_before = member.name
            out = receive(chat, member, line)
            for target, data in out:
                assert target is member  # private answers go to the sender only
                assert json.loads(data)["room"] == member.room.name
            for seq in range(before + 1, member.room.seq + 1):
                sender_of_line[(member.room.name, seq)] = name_before
        for room_name in ROOMS:
            check_room(room_name)


def apply_notice(online: set[str], frame: dict) -> None:
    """What a client does with a notice: the room's members as it sees them."""
    event = frame.get("event")
    if event == "join":
        online.add(frame["name"])
    elif event == "leave":
        online.discard(frame["name"])
    elif event == "nick":
        online.discard(frame["old"])
        online.add(frame["name"])
    elif event == "presence":
        online.difference_update(frame["left"])
        online.update(frame["joined"])


presence_steps = st.lists(st.tuples(st.sampled_from(["join", "leave", "rename", "tick"]),
                                    st.integers(0, 5), st.integers(0, 5)),
                          min_size=1, max_size=15)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), presence_steps)
def test_a_client_that_applies_every_notice_holds_exactly_the_rooms_members(crowd, steps):
    """Around --crowd, whatever the joins, leaves and renames: gathered or
    announced, no notice overtakes another and none names a ghost."""
    chat = Chat(Config(crowd=crowd), clock=Clock())
    watcher, out = chat.join("r", "watcher")
    room = watcher.room
    online = set(json.loads(out[0][1])["online"])
    others = {}
    for action, n, m in steps:
        if action == "join" and n not in others:
            others[n], _ = chat.join("r", f"p{n}")
        elif action == "leave" and n in others:
            chat.leave(others.pop(n))
        elif action == "rename" and n in others:
            receive(chat, others[n], f"/nick q{m}-{n}")
        elif action == "tick":
            room.take_presence()
        for data in room.take_pending():
            apply_notice(online, json.loads(data))
    room.take_presence()
    for data in room.take_pending():
        apply_notice(online, json.loads(data))
    assert online == set(room.online())
