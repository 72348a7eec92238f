// Exec approvals in the browser: the countdowns, and a notification (asked for once) when a
// new request arrives, for people who may decide. No inline script (CSP script-src 'self').
(function () {
  "use strict";
  var seen = null;

  function tick() {
    var now = Date.now();
    document.querySelectorAll("time.countdown").forEach(function (el) {
      var left = Math.max(0, Math.round((Date.parse(el.getAttribute("datetime")) - now) / 1000));
      var m = Math.floor(left / 60), s = left % 60;
      el.textContent = left > 0 ? m + ":" + (s < 10 ? "0" : "") + s : "expired";
    });
  }

  function canDecide() {
    var page = document.querySelector("[data-can-decide]");
    return page && page.getAttribute("data-can-decide") === "1";
  }

  function notifyNew() {
    var ids = [];
    document.querySelectorAll(".pending-approvals .approval-card").forEach(function (el) {
      ids.push(el.id);
    });
    if (seen !== null && canDecide() && "Notification" in window) {
      var fresh = ids.filter(function (id) { return seen.indexOf(id) < 0; });
      if (fresh.length && Notification.permission === "granted") {
        new Notification("Exec approval requested", { body: fresh.length + " new request(s) wait for a decision." });
      }
    }
    seen = ids;
  }

  function askOnce() {
    if (!canDecide() || !("Notification" in window)) return;
    if (Notification.permission === "default" && !localStorage.getItem("approvals-asked")) {
      localStorage.setItem("approvals-asked", "1");
      Notification.requestPermission();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    notifyNew();
    askOnce();
    setInterval(tick, 1000);
    document.body.addEventListener("htmx:wsAfterMessage", function () { tick(); notifyNew(); });
  });
})();
