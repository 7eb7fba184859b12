"""The page's part of issue 13: verified badges, the topic, moderating from
the page, a removed page that does not come back by itself, and ?token=.

Real headless Chromium against a real chatserver.py with --auth-secret on
loopback, tokens made by PyJWT, plain websockets clients as the other
members. One story needs a kick notice about the page's own member before
its 4001 (the server does not send one today: see the README's The page):
a small FakeServer (tests/test_page.py) speaks it.

The browser is Debian's chromium, launched as tests/test_browser.py does
(skipped without it, a failure under CI=true).
"""

from __future__ import annotations

import json
import re
import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

import test_page
from test_browser import WAIT_MS, ChatServerProcess, page_url, sync_playwright
from test_page import FakeServer, now_ms, recv_until, welcome, ws_client

# The same browser, static site and page fixtures as the page's other stories.
browser, site, open_page = test_page.browser, test_page.site, test_page.open_page

if sync_playwright is not None:  # else the browser fixture skips, or fails under CI
    from playwright.sync_api import expect

SECRET = b"m" * 40


def token(name: str, ttl: float = 600, **claims) -> str:
    return jwt.encode({"sub": name, "exp": int(time.time() + ttl), **claims}, SECRET,
                      algorithm="HS256")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    secret = tmp_path_factory.mktemp("auth") / "secret"
    secret.write_bytes(SECRET)
    process = ChatServerProcess("--auth-secret", str(secret))
    yield process
    process.kill()


def row_of(page, text: str):
    return page.page.locator("#messages > li.msg").filter(
        has=page.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))


def person(page, name: str):
    return page.page.locator(f'#online li[data-name="{name}"]')


def shown(locator) -> bool:
    """Whether an element is there to see: opaque, and on top at its centre."""
    return locator.evaluate("""(node) => {
        const box = node.getBoundingClientRect();
        const top = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
        return getComputedStyle(node).opacity === '1' && node.contains(top);
    }""")


def wait_quietly(page, seconds: float) -> None:
    page.page.wait_for_timeout(seconds * 1000)


# The badge ------------------------------------------------------------------


def test_verified_names_carry_a_badge_that_a_guest_cannot_fake(open_page, site, server):
    room = "badge"
    alice = open_page(page_url(site, server=server.url, room=room, token=token("alice")))
    alice.wait_online()
    expect(alice.me).to_have_text("alice")
    faker = open_page(page_url(site, server=server.url, room=room, name="alice✓"))
    faker.wait_online()
    expect(faker.me).to_have_text("alice✓")
    alice.say("signed hello")
    faker.say("I am alice too")
    for page in (alice, faker):
        signed = row_of(page, "signed hello")
        expect(signed.locator(".verified")).to_have_count(1)
        expect(signed.locator(".verified")).to_have_attribute("aria-label", "verified")
        expect(row_of(page, "I am alice too")).to_have_count(1)
        expect(row_of(page, "I am alice too").locator(".verified")).to_have_count(0)
        expect(person(page, "alice").locator(".verified")).to_have_count(1)
        expect(person(page, "alice✓")).to_have_count(1)
        expect(person(page, "alice✓").locator(".verified")).to_have_count(0)
        expect(page.page.locator(".mod-button")).to_have_count(0)  # nobody here moderates

    # A verified member leaves; a guest takes its name and speaks at once:
    # its line is not folded into the verified block (no head, no badge).
    with ws_client(server.url, room, token=token("carol")) as carol:
        carol.send("from the real carol")
        expect(row_of(faker, "from the real carol").locator(".verified")).to_have_count(1)
        expect(person(faker, "carol").locator(".verified")).to_have_count(1)
    expect(person(faker, "carol")).to_have_count(0)
    with ws_client(server.url, room, name="carol") as guest:
        assert json.loads(guest.recv(timeout=WAIT_MS / 1000))["name"] == "carol"
        guest.send("from a guest carol")
        impostor = row_of(faker, "from a guest carol")
        expect(impostor).to_have_count(1)
        expect(impostor).not_to_have_class(re.compile(r"\bcontinued\b"))
        expect(impostor.locator(".msg-head")).to_be_visible()
        expect(impostor.locator(".verified")).to_have_count(0)
        expect(person(faker, "carol")).to_have_count(1)
        expect(person(faker, "carol").locator(".verified")).to_have_count(0)
        # In the history a newcomer gets, no join or leave sits between the
        # two lines: the guest's must still not read as the verified block's.
        newcomer = open_page(page_url(site, server=server.url, room=room, name="late"))
        newcomer.wait_online()
        expect(row_of(newcomer, "from the real carol").locator(".verified")).to_have_count(1)
        impostor = row_of(newcomer, "from a guest carol")
        expect(impostor).not_to_have_class(re.compile(r"\bcontinued\b"))
        expect(impostor.locator(".msg-head")).to_be_visible()
        expect(impostor.locator(".verified")).to_have_count(0)


# The topic ------------------------------------------------------------------


def test_the_topic_shows_under_the_room_name_and_follows_changes(open_page, site, server):
    room = "topics"
    with ws_client(server.url, room, token=token("mod", mod=True)) as mod:
        recv_until(mod, lambda f: f.get("event") == "welcome")
        mod.send("/topic Be kind <b>please</b> https://example.org/")
        recv_until(mod, lambda f: f.get("event") == "topic")
        page = open_page(page_url(site, server=server.url, room=room, name="reader"))
        page.wait_online()
        topic = page.page.locator("#topic")
        expect(topic).to_have_text("Be kind <b>please</b> https://example.org/")  # as text
        expect(topic.locator("*")).to_have_count(0)
        mod.send("/topic New rules")
        expect(topic).to_have_text("New rules")
        expect(page.notice("mod set the topic: New rules")).to_have_count(1)
        mod.send("/topic")
        expect(topic).to_be_hidden()


# Moderating from the page ----------------------------------------------------


def open_moderation(page, button) -> None:
    """Reach a Moderate button with the keyboard and press it."""
    button.focus()
    page.page.keyboard.press("Enter")
    expect(page.page.locator("#mod-dialog")).to_be_visible()


def test_a_moderator_deletes_kicks_and_bans_from_the_page_by_keyboard(open_page, site, server):
    room = "modding"
    mod = open_page(page_url(site, server=server.url, room=room, token=token("boss", mod=[room])))
    mod.wait_online()
    with ws_client(server.url, room, name="troll") as troll, \
            ws_client(server.url, room, token=token("vic")), \
            ws_client(server.url, room, name="watcher") as watcher:
        troll.send("buy cheap stuff")
        seq = recv_until(troll, lambda f: f.get("type") == "user")["seq"]
        troll.send("and more")  # under the same head: its own button, seen when reached
        spam = row_of(mod, "buy cheap stuff")
        expect(spam).to_have_count(1)
        expect(person(mod, "vic")).to_have_count(1)
        more = row_of(mod, "and more")
        expect(more).to_have_class(re.compile(r"\bcontinued\b"))
        more.locator(".mod-button").focus()
        assert shown(more.locator(".mod-button"))

        # Delete, from the message.
        open_moderation(mod, spam.locator(".mod-button"))
        expect(mod.page.locator("#mod-quote")).to_have_text("buy cheap stuff")
        mod.page.locator("#mod-delete").focus()
        mod.page.keyboard.press("Enter")
        notice = recv_until(watcher, lambda f: f.get("event") == "delete")
        assert (notice["seq"], notice["by"]) == (seq, "boss")
        expect(spam).to_have_count(0)
        expect(mod.notice("boss deleted a message")).to_have_count(1)

        # Kick, with a reason, from the online list: typed, then Tab to the button.
        open_moderation(mod, person(mod, "troll").locator(".mod-button"))
        expect(mod.page.locator("#mod-reason")).to_be_focused()
        mod.page.keyboard.type("spamming links")
        mod.page.keyboard.press("Tab")  # the duration (for a ban)
        mod.page.keyboard.press("Tab")  # Kick: Delete is not offered for a member
        expect(mod.page.locator("#mod-kick")).to_be_focused()
        mod.page.keyboard.press("Enter")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                troll.recv(timeout=WAIT_MS / 1000)
        assert closed.value.rcvd.code == 4001
        assert closed.value.rcvd.reason == "removed by boss: spamming links"
        expect(person(mod, "troll")).to_have_count(0)  # no leave notice: the kick says it
        expect(mod.notice("troll was kicked by boss: spamming links")).to_have_count(1)
        expect(mod.page.locator("#mod-dialog")).to_be_hidden()

        # Ban for 2 hours, chosen with the keyboard in the dialog's own field.
        open_moderation(mod, person(mod, "vic").locator(".mod-button"))
        mod.page.keyboard.type("rude")
        mod.page.locator("#mod-duration").focus()
        mod.page.keyboard.press("ArrowUp")  # 1 day -> 1 hour
        expect(mod.page.locator("#mod-duration")).to_have_value("1h")
        mod.page.locator("#mod-ban").focus()
        mod.page.keyboard.press("Enter")
        ban = recv_until(watcher, lambda f: f.get("event") == "kick" and f["name"] == "vic")
        assert ban["ban"] is True and ban["reason"] == "rude"
        assert 3500_000 < ban["until"] - now_ms() <= 3600_000
        expect(person(mod, "vic")).to_have_count(0)
        with pytest.raises(InvalidStatus) as refused:
            ws_client(server.url, room, token=token("vic"))
        assert refused.value.response.status_code == 403
        # Every action went out as the command a moderator types.
        lines = [json.loads(frame)["line"] for frame in mod.sent if isinstance(frame, str)]
        assert [line for line in lines if line.split()[0] in ("/delete", "/kick", "/ban")] == [
            f"/delete {seq}", "/kick troll spamming links", "/ban vic 1h rude"]
        # Its own lines can be deleted, but the moderator cannot remove itself.
        mod.say("my own line")
        own = row_of(mod, "my own line")
        expect(own.locator(".mod-button")).to_have_count(1)
        open_moderation(mod, own.locator(".mod-button"))
        expect(mod.page.locator("#mod-kick")).to_be_hidden()
        expect(mod.page.locator("#mod-delete")).to_be_focused()
        mod.page.keyboard.press("Escape")
        expect(mod.page.locator("#mod-dialog")).to_be_hidden()
        expect(own.locator(".mod-button")).to_be_focused()  # back where it was
        expect(person(mod, "boss").locator(".mod-button")).to_have_count(0)


# A removed page ------------------------------------------------------------------


def test_a_kicked_or_banned_page_says_so_and_does_not_come_back_by_itself(
        open_page, site, server):
    with ws_client(server.url, "kicks", token=token("mod", mod=True)) as mod1, \
            ws_client(server.url, "bans", token=token("mod", mod=True)) as mod2:
        kicked = open_page(page_url(site, server=server.url, room="kicks", name="pest"))
        banned = open_page(page_url(site, server=server.url, room="bans", name="pest"))
        kicked.wait_online()
        banned.wait_online()
        mod1.send("/kick pest being rude")
        mod2.send("/ban pest 10m flooding")
        expect(kicked.page.locator("#messages > li.notice-removed")).to_contain_text(
            "You were removed from #kicks by mod: being rude.")
        removed = banned.page.locator("#messages > li.notice-removed")
        expect(removed).to_contain_text("You were banned from #bans by mod until ")
        expect(removed).to_contain_text(": flooding.")
        for page in (kicked, banned):
            expect(page.status).to_have_attribute("data-state", "offline")
            expect(page.page.locator("#retry")).to_be_hidden()
        wait_quietly(kicked, 3)  # a first retry would come within 0.5 s
        assert len(kicked.sockets) == 1 and len(banned.sockets) == 1

        # A kick is no ban: Rejoin comes back at once. A ban's Rejoin waits
        # for its end (10 minutes).
        page = kicked.page
        page.get_by_role("button", name="Rejoin").focus()
        page.keyboard.press("Enter")
        kicked.wait_online()
        expect(removed.locator("button.rejoin")).to_be_disabled()
        assert len(banned.sockets) == 1


def test_a_ban_notice_about_the_page_says_until_when_and_rejoin_waits_for_it(open_page, site):
    """A server that tells the removed member its kick notice before the
    4001 (see README): the page says it was banned, until when, and its
    Rejoin button opens only then."""
    until = now_ms() + 4000

    async def handler(ws, path):
        await ws.send(json.dumps(welcome("pest", online=["pest", "mod"])))
        if server.count() > 1:  # the rejoin, once the ban is over: it stays
            await ws.wait_closed()
            return
        await ws.send(json.dumps({
            "type": "sys", "event": "kick", "room": "lobby", "ts": now_ms(),
            "message": "pest was banned by mod: flooding", "name": "pest", "by": "mod",
            "reason": "flooding", "ban": True, "until": until}))
        await ws.close(4001, "removed by mod: flooding")

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="pest"))
        removed = page.page.locator("#messages > li.notice-removed")
        expect(removed).to_contain_text("You were banned from #lobby by mod until ")
        expect(removed).to_contain_text(": flooding.")
        rejoin = removed.locator("button.rejoin")
        expect(rejoin).to_be_disabled()
        expect(rejoin).to_contain_text("possible from")
        assert server.count() == 1
        expect(rejoin).to_be_enabled(timeout=8000)
        assert server.count() == 1  # not by itself, even once the ban is over
        rejoin.click()
        page.wait_online()
        assert server.count() == 2
    finally:
        server.stop()


# The token ------------------------------------------------------------------


def test_a_token_in_the_url_reaches_the_socket_and_stays_in_the_tab_only(
        open_page, site, server):
    signed = token("dana", mod=["tok"])
    page = open_page(page_url(site, server=server.url, room="tok", token=signed))
    page.wait_online()
    expect(page.me).to_have_text("dana")
    assert f"token={signed}" in page.sockets[0]
    assert "token" not in page.page.url and "room=tok" in page.page.url
    assert signed not in (page.status.get_attribute("title") or "")
    stored = page.page.evaluate("""() => ({
        local: Object.keys(localStorage).map((k) => k + '=' + localStorage.getItem(k)).join(' '),
        session: Object.keys(sessionStorage).map((k) => sessionStorage.getItem(k)).join(' '),
        history: JSON.stringify(history.state) })""")
    assert signed not in stored["local"] and signed not in stored["history"]
    assert signed in stored["session"]
    # A reload of the tab is still signed in, with nothing in the address bar.
    page.page.reload()
    page.wait_online()
    expect(page.me).to_have_text("dana")
    assert f"token={signed}" in page.sockets[-1] and "token" not in page.page.url
    # Another tab of the same browser (the same localStorage) is a guest.
    other = open_page(page_url(site, server=server.url, room="tok"),
                      context=page.page.context)
    other.wait_online()
    assert "token=" not in other.sockets[0]
    expect(other.me).not_to_have_text("dana")


def test_a_page_whose_token_has_expired_says_what_may_be_wrong(open_page, site, server):
    """The server refuses it with a 401 the page cannot read: after a few
    tries the page says the sign-in may have expired, and goes on with its
    usual backoff (no faster)."""
    page = open_page(page_url(site, server=server.url, room="late", token=token("old", ttl=-60)))
    expect(page.page.locator("#status-detail")).to_contain_text(
        "If your sign-in has expired, open the chat again from the site", timeout=8000)
    assert len(page.sockets) <= 5
    expect(page.status).to_have_attribute("data-state", "offline")
