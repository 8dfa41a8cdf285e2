// kratos-session-bridge admin dashboard: live refresh without reloading the page.
// Every `data-refresh` seconds the page fetches itself and swaps in the new <main>,
// unless the tab is hidden or the operator is typing in a form.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh"));
  if (!seconds || !window.fetch || !window.DOMParser) return;

  function busy() {
    var active = document.activeElement;
    return active && active.closest && active.closest("form, details[open]") !== null;
  }

  function refresh() {
    if (document.visibilityState !== "visible" || busy()) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (!response.ok || response.redirected) throw new Error("refresh: " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var main = fresh.getElementById("content");
        var updated = fresh.getElementById("updated");
        if (!main) return;
        document.getElementById("content").replaceChildren.apply(
          document.getElementById("content"), Array.prototype.slice.call(main.childNodes));
        if (updated) document.getElementById("updated").replaceWith(updated);
      })
      .catch(function () { /* keep what is shown; the next round tries again */ });
  }

  window.setInterval(refresh, seconds * 1000);
})();
