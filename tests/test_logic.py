"""The chat logic without sockets: rooms, names, commands, history, limits."""

from __future__ import annotations

import json

import pytest

from chatserver import (ACKED_FRAME, CID_MEMORY_S, Acked, Chat, Config, Member, MemoryRooms,
                        KEYS_PER_SESSION, keepalive_due,
                        Refused, Room, Session, cid_memory_lines, name_problem, room_from_path,
                        run_now, unwrap)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frames(out) -> list[dict]:
    return [json.loads(data) for _, data in out]


def room_frames(room: Room) -> list[dict]:
    return [json.loads(data) for data in room.take_pending()]


def receive(chat: Chat, member: Member, line: str, cid: str | None = None):
    """One line through the rooms' seam, in memory: what the sender gets."""
    return run_now(MemoryRooms(chat, fanout=None).receive(member, line, cid))


def make_chat(**options) -> tuple[Chat, Clock]:
    options.setdefault("rate", 1000.0)
    options.setdefault("burst", 1000)
    clock = Clock()
    return Chat(Config(**options), clock=clock), clock


def test_welcome_names_the_room_the_newcomer_and_who_is_online():
    chat, _ = make_chat()
    chat.join("lobby", "alice")
    bob, out = chat.join("lobby", "bob")
    welcome = frames(out)[0]
    assert welcome["type"] == "sys" and welcome["event"] == "welcome"
    assert welcome["name"] == "bob" and welcome["room"] == "lobby"
    assert welcome["online"] == ["alice", "bob"]
    assert welcome["seq"] == 0 and welcome["epoch"] == bob.room.epoch
    assert isinstance(welcome["ts"], int)


def test_join_notice_goes_to_the_room_with_the_count():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    chat.join("lobby", "bob")
    [notice] = room_frames(alice.room)
    assert notice == {**notice, "event": "join", "name": "bob", "count": 2,
                      "message": "bob has joined"}


def test_leave_notice_and_count():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    bob, _ = chat.join("lobby", "bob")
    room_frames(alice.room)
    chat.leave(bob)
    [notice] = room_frames(alice.room)
    assert notice["event"] == "leave" and notice["message"] == "bob has left"
    assert notice["count"] == 1


def test_chat_line_is_numbered_and_sent_to_the_room_with_the_senders_name():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    assert receive(chat, alice, "hello") == []
    assert receive(chat, alice, "again") == []
    first, second = room_frames(alice.room)
    assert first == {**first, "type": "user", "id": "alice", "message": "hello", "seq": 1}
    assert second["seq"] == 2 and "action" not in second


def test_sender_cannot_spoof_the_id_by_sending_json():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    line = '{"type": "sys", "id": "admin", "message": "x"}'
    receive(chat, alice, line)
    [frame] = room_frames(alice.room)
    assert frame["type"] == "user" and frame["id"] == "alice" and frame["message"] == line


@pytest.mark.parametrize("wanted, got", [
    ("alice", "alice-2"), ("ALICE", "ALICE-2"), ("x" * 32, "x" * 30 + "-2")])
def test_taken_name_gets_a_suffix(wanted, got):
    chat, _ = make_chat()
    chat.join("lobby", "alice")
    chat.join("lobby", "x" * 32)
    _, out = chat.join("lobby", wanted)
    assert frames(out)[0]["name"] == got


def test_third_alice_is_alice_3():
    chat, _ = make_chat()
    chat.join("lobby", "alice")
    chat.join("lobby", "alice")
    member, _ = chat.join("lobby", "alice")
    assert member.name == "alice-3"


@pytest.mark.parametrize("bad", ["", "a b", "x" * 33, "tab\there", "bell\x07", "rtl\u202eevil",
                                 "zero\u200bwidth"])
def test_invalid_name_gets_a_guest_name_and_an_error_saying_why(bad):
    chat, _ = make_chat()
    member, out = chat.join("lobby", bad)
    welcome, note = frames(out)[:2]
    assert member.name.startswith("guest-") and welcome["name"] == member.name
    assert note["event"] == "error" and "guest" in note["message"]


def test_no_name_gets_a_guest_name_without_an_error():
    chat, _ = make_chat()
    member, out = chat.join("lobby")
    assert member.name.startswith("guest-")
    assert [f["event"] for f in frames(out)] == ["welcome"]


def test_unicode_letters_are_welcome_in_names():
    assert name_problem("Zoë") is None
    assert name_problem("小明") is None
    assert name_problem("Алиса") is None


def test_nick_changes_the_name_and_tells_the_room():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    assert receive(chat, alice, "/nick Alicia") == []
    [notice] = room_frames(alice.room)
    assert notice == {**notice, "event": "nick", "old": "alice", "name": "Alicia",
                      "message": "alice is now known as Alicia"}
    receive(chat, alice, "hi")
    assert room_frames(alice.room)[0]["id"] == "Alicia"


def test_nick_to_a_taken_name_is_refused():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    chat.join("lobby", "bob")
    room_frames(alice.room)
    [reply] = frames(receive(chat, alice, "/nick Bob"))
    assert reply["event"] == "error" and "taken" in reply["message"]
    assert alice.name == "alice" and room_frames(alice.room) == []


def test_nick_may_change_only_the_case_of_ones_own_name():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    assert receive(chat, alice, "/nick Alice") == []
    assert alice.room.online() == ["Alice"]


@pytest.mark.parametrize("line", ["/nick", "/nick a b", "/nick " + "y" * 40])
def test_bad_nick_gets_an_error(line):
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    [reply] = frames(receive(chat, alice, line))
    assert reply["event"] == "error"


def test_me_sends_an_action():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    receive(chat, alice, "/me waves")
    [frame] = room_frames(alice.room)
    assert frame["action"] is True and frame["message"] == "waves" and frame["seq"] == 1


def test_who_and_help_answer_only_the_asker():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    chat.join("lobby", "bob")
    room_frames(alice.room)
    [reply] = frames(receive(chat, alice, "/who"))
    assert reply["event"] == "who" and reply["online"] == ["alice", "bob"]
    assert "alice" in reply["message"] and "bob" in reply["message"]
    [reply] = frames(receive(chat, alice, "/help"))
    assert reply["event"] == "help" and "/nick" in reply["message"]
    assert room_frames(alice.room) == []


def test_unknown_command_gets_an_error():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    [reply] = frames(receive(chat, alice, "/dance now"))
    assert reply["event"] == "error" and "/dance" in reply["message"]


def test_double_slash_sends_a_literal_slash():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    receive(chat, alice, "//nick is a command")
    assert room_frames(alice.room)[0]["message"] == "/nick is a command"


@pytest.mark.parametrize("line", ["", " ", "\n\t  "])
def test_whitespace_only_lines_are_ignored(line):
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    assert receive(chat, alice, line) == []
    assert room_frames(alice.room) == [] and alice.room.seq == 0


def test_line_over_max_chars_gets_an_error_and_is_not_sent():
    chat, _ = make_chat(max_chars=10)
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    assert receive(chat, alice, "x" * 10) == []
    [reply] = frames(receive(chat, alice, "x" * 11))
    assert reply["event"] == "error" and "too long" in reply["message"]
    assert [f["message"] for f in room_frames(alice.room)] == ["x" * 10]


def test_control_characters_in_text_are_refused_but_newlines_are_kept():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    [reply] = frames(receive(chat, alice, "beep\x07"))
    assert reply["event"] == "error"
    receive(chat, alice, "two\nlines")
    assert room_frames(alice.room)[0]["message"] == "two\nlines"


def test_rooms_are_isolated():
    chat, _ = make_chat()
    alice, _ = chat.join("one", "alice")
    bob, _ = chat.join("two", "alice")
    room_frames(alice.room), room_frames(bob.room)
    receive(chat, alice, "in one")
    assert room_frames(bob.room) == []
    assert bob.name == "alice"  # names are unique per room, not per server


# History and resume


def post_lines(chat: Chat, member: Member, count: int) -> None:
    for n in range(count):
        receive(chat, member, f"line {n + 1}")
    member.room.take_pending()


def test_newcomer_gets_history_oldest_first_after_the_welcome():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 3)
    _, out = chat.join("lobby", "bob")
    got = frames(out)
    assert got[0]["event"] == "welcome" and got[0]["seq"] == 3
    assert [f["seq"] for f in got[1:]] == [1, 2, 3]
    assert [f["message"] for f in got[1:]] == ["line 1", "line 2", "line 3"]


def test_history_keeps_only_the_last_n_messages():
    chat, _ = make_chat(history=2)
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 5)
    _, out = chat.join("lobby", "bob")
    assert [f.get("seq") for f in frames(out)] == [5, 4, 5]


def test_history_replays_the_original_frames():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    receive(chat, alice, "hi")
    [live] = alice.room.take_pending()[1:]
    _, out = chat.join("lobby", "bob")
    assert out[1][1] == live


def test_messages_not_yet_sent_are_not_in_the_newcomers_history():
    # They reach the newcomer through the fan-out, so there is no duplicate.
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 1)
    receive(chat, alice, "still pending")
    bob, out = chat.join("lobby", "bob")
    assert [f.get("seq") for f in frames(out)] == [1, 1]
    assert [f.get("seq") for f in room_frames(bob.room) if f["type"] == "user"] == [2]


def test_resume_gets_only_what_came_after_since():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 5)
    _, out = chat.join("lobby", "bob", since=3, epoch=alice.room.epoch)
    assert [f.get("seq") for f in frames(out)] == [5, 4, 5]


def test_resume_up_to_date_gets_nothing_but_the_welcome():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 5)
    _, out = chat.join("lobby", "bob", since=5, epoch=alice.room.epoch)
    assert [f["event"] for f in frames(out)] == ["welcome"]


def test_resume_past_the_kept_history_reports_the_gap_first():
    chat, _ = make_chat(history=3)
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 10)
    _, out = chat.join("lobby", "bob", since=2, epoch=alice.room.epoch)
    got = frames(out)
    assert got[1]["event"] == "gap" and got[1]["missed"] == 5  # seqs 3..7
    assert [f["seq"] for f in got[2:]] == [8, 9, 10]


def test_resume_with_another_epoch_gets_the_full_history():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 3)
    _, out = chat.join("lobby", "bob", since=2, epoch="not-this-one")
    assert [f.get("seq") for f in frames(out)[1:]] == [1, 2, 3]


def test_empty_room_keeps_history_for_the_ttl_then_starts_a_new_epoch():
    chat, clock = make_chat(room_ttl=60)
    alice, _ = chat.join("lobby", "alice")
    post_lines(chat, alice, 2)
    epoch = alice.room.epoch
    chat.leave(alice)
    clock.now += 59
    bob, out = chat.join("lobby", "bob")
    assert bob.room.epoch == epoch and len(frames(out)) == 3
    chat.leave(bob)
    clock.now += 60
    carol, out = chat.join("lobby", "carol")
    assert carol.room.epoch != epoch and len(frames(out)) == 1
    assert frames(out)[0]["seq"] == 0


def test_sweep_forgets_only_rooms_idle_past_the_ttl():
    chat, clock = make_chat(room_ttl=10)
    alice, _ = chat.join("a", "alice")
    chat.join("b", "bob")
    chat.leave(alice)
    clock.now += 10
    assert chat.forget_idle_rooms() == 1
    assert list(chat.rooms) == ["b"]


# Limits


def test_max_rooms_refuses_a_new_room_but_not_an_existing_one():
    chat, _ = make_chat(max_rooms=1)
    chat.join("a", "alice")
    chat.check_room("a")
    with pytest.raises(Refused) as refusal:
        chat.check_room("b")
    assert refusal.value.status == 503


def test_max_rooms_makes_room_by_forgetting_an_idle_one():
    chat, _ = make_chat(max_rooms=1)
    alice, _ = chat.join("a", "alice")
    chat.leave(alice)
    chat.check_room("b")
    assert "a" not in chat.rooms


def test_flooding_gets_one_error_a_second_then_the_door():
    chat, clock = make_chat(rate=1, burst=2, flood_close=10)
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    assert receive(chat, alice, "1") == [] and receive(chat, alice, "2") == []
    [reply] = frames(receive(chat, alice, "3"))
    assert reply["event"] == "error" and "slow down" in reply["message"]
    assert receive(chat, alice, "4") == []  # no second error within the second
    assert [f["message"] for f in room_frames(alice.room)] == ["1", "2"]
    for _ in range(20):  # keeps flooding: 20 lines a second for 10 s
        clock.now += 0.5
        for _ in range(10):
            receive(chat, alice, "spam")
    assert alice.close_with == (1008, "flooding")


def test_a_client_that_reconnects_goes_on_with_the_bucket_it_left():
    chat, clock = make_chat(rate=1, burst=3)
    alice, _ = chat.join("lobby", "alice", address="10.0.0.1")
    assert all(receive(chat, alice, str(n)) == [] for n in range(3))  # the burst, spent
    chat.leave(alice)
    chat.keep_bucket(alice)
    back, _ = chat.join("lobby", "alice", address="10.0.0.1")
    [reply] = frames(receive(chat, back, "no fresh burst"))
    assert "slow down" in reply["message"]
    clock.now += 1  # --rate: one more a second, as if it had stayed
    assert receive(chat, back, "4") == []
    other, _ = chat.join("lobby", "bob", address="10.0.0.2")  # another address: its own
    assert all(receive(chat, other, str(n)) == [] for n in range(3))
    chat.leave(back)
    chat.keep_bucket(back)
    clock.now += 3  # --burst / --rate: full again, and forgotten
    chat.keep_bucket(other)  # full again too: as good as new, not kept
    assert not chat.buckets_left
    again, _ = chat.join("lobby", "alice", address="10.0.0.1")
    assert all(receive(chat, again, str(n)) == [] for n in range(3))


def test_behind_one_address_a_page_back_with_its_key_has_its_own_bucket():
    chat, clock = make_chat(rate=1, burst=3)
    alice, out = chat.join("lobby", "alice", address="10.0.0.1")
    assert frames(receive(chat, alice, "hi", cid="c1"))[0]["event"] == "ack"
    mallory, _ = chat.join("lobby", "mallory", address="10.0.0.1")  # the same office
    for _ in range(3):
        receive(chat, mallory, "spam")
    for member in (mallory, alice):
        chat.leave(member)
        chat.keep_bucket(member)
    back, _ = chat.join("lobby", "alice", address="10.0.0.1", key=frames(out)[0]["key"])
    assert receive(chat, back, "1") == [] and receive(chat, back, "2") == []  # what it had
    newcomer, _ = chat.join("lobby", "nina", address="10.0.0.1")  # no key: the address's
    assert "slow down" in frames(receive(chat, newcomer, "hello"))[0]["message"]


def test_a_page_back_with_its_key_is_not_given_a_flooders_bucket():
    chat, clock = make_chat(rate=1, burst=3)
    alice, out = chat.join("lobby", "alice", address="10.0.0.1")
    assert frames(receive(chat, alice, "hi", cid="c1"))[0]["event"] == "ack"
    clock.now += 1  # full again: nothing of hers is kept
    chat.leave(alice)
    chat.keep_bucket(alice)
    mallory, _ = chat.join("lobby", "mallory", address="10.0.0.1")
    for _ in range(5):
        receive(chat, mallory, "spam")
    chat.leave(mallory)
    chat.keep_bucket(mallory)
    back, _ = chat.join("lobby", "alice", address="10.0.0.1", key=frames(out)[0]["key"])
    assert all(receive(chat, back, str(n)) == [] for n in range(3))  # her own: a full one


def test_a_newcomer_from_a_flooders_address_gets_its_tokens_but_not_its_door():
    chat, clock = make_chat(rate=1, burst=2, flood_close=10)
    mallory, _ = chat.join("lobby", "mallory", address="10.0.0.1")
    for _ in range(11):  # a flood of 11 s: the door
        receive(chat, mallory, "spam")
        clock.now += 1
        receive(chat, mallory, "spam")
        receive(chat, mallory, "spam")
    assert mallory.close_with == (1008, "flooding")
    chat.leave(mallory)
    chat.keep_bucket(mallory)
    nina, _ = chat.join("lobby", "nina", address="10.0.0.1")  # the same office
    assert "slow down" in frames(receive(chat, nina, "hello"))[0]["message"]  # no fresh burst
    assert nina.close_with is None


def test_a_flood_goes_on_across_reconnects_until_the_door():
    chat, clock = make_chat(rate=1, burst=2, flood_close=10)
    key = None
    for _ in range(40):  # a new connection every 0.5 s, each with 10 lines
        alice, out = chat.join("lobby", "alice", key=key)  # its session: acked lines
        key = frames(out)[0]["key"]
        for n in range(10):
            receive(chat, alice, "spam", cid=f"c{clock.now}-{n}")
        if alice.close_with is not None:
            break
        chat.leave(alice)
        chat.keep_bucket(alice)
        clock.now += 0.5
    assert alice.close_with == (1008, "flooding") and clock.now - 1000 >= 10
    assert alice.room.seq <= 2 + 10  # the burst, then --rate


def test_a_client_within_the_rate_is_never_limited():
    chat, clock = make_chat(rate=2, burst=2)
    alice, _ = chat.join("lobby", "alice")
    for _ in range(100):
        clock.now += 0.5
        assert receive(chat, alice, "steady") == []
    assert alice.room.seq == 100


@pytest.mark.parametrize("path, room", [("/", "lobby"), ("/soc", "soc"),
                                        ("/a.b-c_D9", "a.b-c_D9"), ("/" + "r" * 64, "r" * 64)])
def test_room_from_path(path, room):
    assert room_from_path(path) == room


@pytest.mark.parametrize("path", ["/a/b", "/a%2Fb", "/" + "r" * 65, "/..", "/.", "/caf\u00e9",
                                  "/a b", "//", "/a/"])
def test_bad_room_paths_are_refused_with_400(path):
    with pytest.raises(Refused) as refusal:
        room_from_path(path)
    assert refusal.value.status == 400


def test_crowded_room_gathers_joins_and_leaves_into_one_presence_notice():
    chat, _ = make_chat(crowd=3)
    members = [chat.join("big", f"user{n}")[0] for n in range(3)]
    room = members[0].room
    assert [f["event"] for f in room_frames(room)] == ["join"] * 3
    newcomers = [chat.join("big", f"new{n}")[0] for n in range(25)]
    chat.leave(members[0])
    assert room_frames(room) == []  # nothing one by one past the crowd size
    room.take_presence()
    [notice] = room_frames(room)
    assert notice["event"] == "presence" and notice["count"] == 27
    assert notice["joined"] == [m.name for m in newcomers[:20]] and notice["more_joined"] == 5
    assert notice["left"] == ["user0"] and notice["more_left"] == 0
    assert notice["message"] == ", ".join(notice["joined"]) + " and 5 others joined; user0 left"
    room.take_presence()
    assert room_frames(room) == []


def test_the_welcome_key_names_the_holder_of_a_name_and_nothing_else():
    chat, _ = make_chat()
    alice, out = chat.join("lobby", "Alice")
    key = frames(out)[0]["key"]
    assert len(key) >= 16 and key == alice.key
    assert chat.holder("lobby", "alice", key) is alice  # names fold, as when joining
    assert chat.holder("lobby", "alice", "not-the-key") is None
    assert chat.holder("lobby", "alice", "") is None
    assert chat.holder("lobby", None, key) is None
    assert chat.holder("elsewhere", "alice", key) is None
    bob, out = chat.join("lobby", "bob")
    assert frames(out)[0]["key"] != key  # a key per member
    assert chat.holder("lobby", "bob", key) is None  # one member's key is not another's
    assert all("key" not in frame for frame in room_frames(alice.room))  # never to the room


def test_a_leave_and_a_join_of_one_name_within_the_second_cancel_out():
    chat, _ = make_chat(crowd=1)
    members = [chat.join("big", f"m{n}")[0] for n in range(3)]
    room = members[0].room
    room.take_presence()
    room_frames(room)
    chat.leave(members[0])  # m0's connection replaced: leaves...
    chat.join("big", "m0")  # ...and is back: nobody misses it
    brief, _ = chat.join("big", "brief")  # came and went: nobody saw it
    chat.leave(brief)
    chat.join("big", "stays")
    room.take_presence()
    [notice] = room_frames(room)
    assert notice["joined"] == ["stays"] and notice["left"] == []
    assert notice["count"] == 4


def test_once_a_change_is_kept_the_next_ones_are_kept_too_even_below_the_crowd():
    chat, _ = make_chat(crowd=2)
    a, _ = chat.join("r", "a")
    chat.join("r", "b")
    room = a.room
    room_frames(room)
    c, _ = chat.join("r", "c")  # 3 > crowd: kept
    chat.leave(c)  # back at the crowd: it must not overtake c's join
    assert room_frames(room) == [] and room.unannounced == {}
    d, _ = chat.join("r", "d")
    chat.rename(d, "dora")  # the kept join of d goes out before the nick notice
    assert [(f["event"], f.get("joined"), f.get("name")) for f in room_frames(room)] == \
        [("presence", ["d"], None), ("nick", None, "dora")]


# Acked lines (acks=1) -------------------------------------------------------


def test_a_session_keeps_its_last_1000_lines_and_all_of_the_last_10_minutes():
    session = Session()
    for n in range(1500):  # all within ten minutes: all kept
        session.remember(f"c{n}", n, now=n * 0.1, most=3020)
    assert session.recall("c0") == Acked(0) and len(session.lines) == 1500
    session.remember("late", None, now=150 + CID_MEMORY_S, most=3020)  # the first ones are old now
    assert len(session.lines) == 1000 and session.recall("c0") is None
    assert session.recall("late") == Acked(None) and session.recall("c1499") == Acked(1499)


def test_a_session_never_keeps_more_lines_than_a_client_within_the_rate_can_send():
    chat, clock = make_chat(rate=1, burst=20)
    assert cid_memory_lines(chat.config) == 1000  # 1 x 600 + 20 is fewer
    assert cid_memory_lines(Config()) == 3020  # --rate 5 x 600 s + --burst 20
    session = Session()
    for n in range(5000):  # all within a second: the oldest go all the same
        session.remember(f"c{n}", n, now=n * 0.0001, most=3020)
    assert len(session.lines) == 3020 and session.recall("c1979") is None
    assert session.recall("c1980") == Acked(1980) and session.recall("c4999") == Acked(4999)


def test_a_session_is_forgotten_only_once_it_has_been_without_a_connection_long_enough():
    chat, clock = make_chat(room_ttl=3600)
    alice, out = chat.join("lobby", "alice")
    key = frames(out)[0]["key"]
    receive(chat, alice, "hi", cid="c1")
    chat.leave(alice)
    clock.now += 3599
    chat.forget_idle_sessions()
    back, _ = chat.join("lobby", "alice", key=key)
    assert back.session == alice.session and chat.recall(back, "c1") == Acked(1)
    chat.leave(back)
    clock.now += 3600
    chat.forget_idle_sessions()
    again, _ = chat.join("lobby", "alice", key=back.key)
    assert again.session != back.session and chat.recall(again, "c1") is None


def test_an_acked_line_gets_one_ack_and_is_posted_once():
    chat, _ = make_chat()
    alice, _ = chat.join("lobby", "alice")
    room_frames(alice.room)
    [ack] = frames(receive(chat, alice, "hello", cid="c1"))
    assert ack["event"] == "ack" and ack["cid"] == "c1" and ack["seq"] == 1
    [again] = frames(receive(chat, alice, "hello", cid="c1"))
    assert again["seq"] == 1
    assert [f["seq"] for f in room_frames(alice.room) if f["type"] == "user"] == [1]


def test_a_refused_acked_line_gets_an_error_with_its_cid_and_is_not_remembered():
    chat, _ = make_chat(max_chars=5)
    alice, _ = chat.join("lobby", "alice")
    [error] = frames(receive(chat, alice, "too long", cid="c1"))
    assert error["event"] == "error" and error["cid"] == "c1"
    [ack] = frames(receive(chat, alice, "short", cid="c1"))  # judged afresh
    assert ack["event"] == "ack" and ack["seq"] == 1


@pytest.mark.parametrize("text, expected", [
    ('{"cid": "a1", "line": "hi"}', ("a1", "hi", None)),
    ('{"cid": "a1", "line": ""}', ("a1", "", None)),
    ('{"cid": "a1"}', ("a1", None, ACKED_FRAME)),
    ('{"cid": "a b", "line": "hi"}', (None, None, ACKED_FRAME)),
    ('not json', (None, None, ACKED_FRAME)),
    ('["a1", "hi"]', (None, None, ACKED_FRAME)),
])
def test_unwrap_reads_an_acked_frame_or_says_what_was_expected(text, expected):
    assert unwrap(text) == expected


@pytest.mark.parametrize("interval, timeout", [(20, 20), (0.2, 0.3), (60, 5)])
def test_a_silent_peer_is_found_dead_within_ping_interval_plus_ping_timeout(interval, timeout):
    step = max(0.05, min(1.0, interval / 4, timeout / 4))
    pinged_at, dead_at, quiet = None, None, 0.0
    while dead_at is None:  # the keepalive's rounds, from the peer's last frame on
        quiet += step
        due = keepalive_due(quiet, pinged_at is not None, interval, timeout, step)
        if due == "ping":
            pinged_at = quiet
        elif due == "dead":
            dead_at = quiet
    assert pinged_at is not None and pinged_at <= interval
    assert dead_at - pinged_at >= timeout - 2 * step  # the ping had its time to be answered
    assert dead_at <= interval + timeout + 1e-9


def test_history_is_bounded_in_bytes_as_well_as_in_lines():
    chat, _ = make_chat(history=100, history_bytes=20_000)
    alice, _ = chat.join("lobby", "alice")
    for n in range(10):
        receive(chat, alice, f"{n}" + "\U0001F600" * 1999)  # the longest line: about 8 KB
    room = alice.room
    assert [seq for seq, _ in room.history] == [9, 10]
    assert room.history_size == sum(len(data) for _, data in room.history) <= 20_000
    receive(chat, alice, "x" * 2000)
    assert len(room.history) == 3  # small lines still fit beside them


def enter(chat: Chat, room: str, address: str) -> Member:
    """As the server lets a newcomer in: check, reserve, join, release."""
    chat.check_room(room, address)
    reservation = chat.reserve(room, address)
    chat.open_room(room, address, reservation=reservation)
    member, _ = chat.join(room, "x", address=address)
    chat.release(reservation)
    return member


def test_an_address_opens_rooms_up_to_its_limits():
    chat, clock = make_chat(rooms_per_ip=3, new_rooms_per_min=2)
    enter(chat, "a", "1.2.3.4")
    enter(chat, "b", "1.2.3.4")
    with pytest.raises(Refused, match="too fast"):
        chat.check_room("c", "1.2.3.4")
    chat.check_room("c", "5.6.7.8")  # another address is not held back
    clock.now += 30  # 2 a minute: one more after half a minute
    enter(chat, "c", "1.2.3.4")
    clock.now += 60
    with pytest.raises(Refused, match="too many rooms opened"):
        chat.check_room("d", "1.2.3.4")
    chat.check_room("a", "1.2.3.4")  # an open room is always open to it


def test_newcomers_on_their_way_into_new_rooms_count_before_they_are_in():
    chat, _ = make_chat(rooms_per_ip=2, new_rooms_per_min=100)
    reservations = []
    for room in ("a", "b"):  # two joins waiting (for Redis, the store): not in yet
        chat.check_room(room, "1.2.3.4")
        reservations.append(chat.reserve(room, "1.2.3.4"))
    with pytest.raises(Refused, match="too many rooms opened"):
        chat.check_room("c", "1.2.3.4")
    chat.open_room("a", "1.2.3.4", reservation=reservations[0])  # one got in: still 2
    with pytest.raises(Refused, match="too many rooms opened"):
        chat.check_room("c", "1.2.3.4")
    for reservation in reservations:
        chat.release(reservation)  # the other failed: its place is free again
    chat.check_room("c", "1.2.3.4")


def test_sessions_of_clients_that_left_are_kept_only_up_to_max_clients():
    chat, clock = make_chat(max_clients=3)
    keys = []
    for n in range(5):  # five clients come, send an acked line, and go
        member, out = chat.join("lobby", f"c{n}")
        keys.append(frames(out)[0]["key"])
        receive(chat, member, "hi", cid="c")
        chat.leave(member)
        clock.now += 1
    assert len(chat.sessions) == 3 and len(chat.keys) == 3
    back, _ = chat.join("lobby", "c4", key=keys[4])  # the latest is still known
    assert chat.recall(back, "c") is not None
    gone, _ = chat.join("lobby", "c0", key=keys[0])  # the first was forgotten
    assert chat.recall(gone, "c") is None


def test_a_session_keeps_only_its_newest_keys():
    chat, _ = make_chat()
    member, out = chat.join("lobby", "alice")
    key = frames(out)[0]["key"]
    receive(chat, member, "hi", cid="c1")  # a session worth keeping
    for _ in range(20):  # reconnects that never speak: no key is spent
        chat.leave(member)
        member, out = chat.join("lobby", "alice", key=member.key)
    session = chat.sessions[member.session]
    assert len(session.keys) == KEYS_PER_SESSION and len(chat.keys) == KEYS_PER_SESSION
    assert member.key in session.keys and key not in chat.keys


def test_control_characters_are_unicode_cc_but_newline_and_tab():
    import unicodedata
    from chatserver import text_problem
    refused = [chr(c) for c in range(0x110000) if text_problem(f"a{chr(c)}b", 10)]
    assert refused == [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc"
                       and chr(c) not in "\n\t"]


def test_frames_are_encoded_as_compact_json_with_text_as_it_is():
    from chatserver import encode
    frame = {"type": "user", "id": "é\u2028\"\\\x01</script>", "message": "😀 x",
             "seq": 1, "ts": 2.5, "action": True, "none": None, "list": [1, {"a": "b"}]}
    assert encode(frame) == json.dumps(frame, ensure_ascii=False,
                                       separators=(",", ":")).encode()
    with pytest.raises(UnicodeEncodeError):  # as json.dumps(...).encode() would
        encode({"message": "\ud800"})
