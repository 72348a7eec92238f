// Live fleet pages: htmx and its ws extension do the work; this file only
// (1) says "reconnecting…" while the page's socket is down ("signed out" when it
//     was closed because the account lost access),
// (2) (re)connects with the filters the session list currently shows, and
// (3) tells the open socket when an htmx swap changed those filters, and
// (4) keeps relative times ("5 minutes ago") current between pushes.
(function () {
  "use strict";
  var socket = null;

  function setStatus(text, down) {
    var el = document.getElementById("live-status");
    if (el) {
      el.textContent = text;
      el.classList.toggle("down", down);
    }
    document.body.classList.toggle("ws-down", down);
  }

  function currentQuery() {
    var list = document.getElementById("session-list");
    return list ? list.getAttribute("data-query") || "" : null;
  }

  // The navigation's badge socket (/ws/nav/, on every page) is not this page's socket.
  function fromNav(event) {
    return !!(event.target && event.target.closest && event.target.closest(".topnav"));
  }

  // Every (re)connect asks for the list as the browser shows it now.
  htmx.createWebSocket = function (url) {
    var query = currentQuery();
    if (query !== null && url.indexOf("/ws/fleet/") !== -1) {
      url = url.split("?")[0] + (query ? "?" + query : "");
    }
    return new WebSocket(url);
  };

  document.addEventListener("htmx:wsOpen", function (event) {
    if (fromNav(event)) return;
    socket = event.detail.socketWrapper;
    setStatus("live", false);
  });
  document.addEventListener("htmx:wsClose", function (event) {
    if (fromNav(event)) return;
    // 4003: the account lost access (logged out, deactivated, no role): no reconnect
    // (fleet/live.py CLOSE_ACCESS_LOST).
    var closed = event.detail && event.detail.event;
    if (closed && closed.code === 4003) {
      setStatus("signed out: reload the page", true);
    } else {
      setStatus("reconnecting…", true);
    }
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail.target;
    if (socket && target && target.id === "session-list") {
      var list = document.getElementById("session-list");
      socket.send(JSON.stringify({ query: list.getAttribute("data-query") || "" }), null);
    }
  });

  // Django's `timesince`, to two adjacent units: "3 hours, 5 minutes".
  var UNITS = [
    ["year", 365 * 86400], ["month", 30 * 86400], ["week", 7 * 86400],
    ["day", 86400], ["hour", 3600], ["minute", 60]
  ];
  function since(seconds) {
    for (var i = 0; i < UNITS.length; i++) {
      var count = Math.floor(seconds / UNITS[i][1]);
      if (count > 0) {
        var text = plural(count, UNITS[i][0]);
        if (i + 1 < UNITS.length) {
          var rest = Math.floor((seconds - count * UNITS[i][1]) / UNITS[i + 1][1]);
          if (rest > 0) text += ", " + plural(rest, UNITS[i + 1][0]);
        }
        return text;
      }
    }
    return "0 minutes";
  }
  function plural(count, unit) {
    return count + "\u00a0" + unit + (count === 1 ? "" : "s");
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time.ago[datetime]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = since(Math.max(0, (now - at) / 1000)) + " ago";
    });
  }
  setInterval(tick, 30000);
  // Rows pushed or fetched meanwhile carry the server's text: count them by this clock too.
  document.addEventListener("htmx:wsAfterMessage", tick);
  document.addEventListener("htmx:afterSettle", tick);
})();
