// While a payment is being confirmed, ask our server now and then and show the result when it is
// known. (No <meta refresh>: a page that reloads by itself on a timer is hard to use with a screen
// reader.) Without JavaScript the "Check again now" button does the same.
(function () {
  "use strict";
  var box = document.getElementById("processing");
  if (!box || !window.fetch) { return; }
  var url = box.dataset.statusUrl;
  var inFlight = ["created", "requires_confirmation", "processing", "pending"];
  var tries = 0;
  function check() {
    tries += 1;
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.json(); })
      .then(function (state) {
        var settled = state.invoice_status !== "processing" && inFlight.indexOf(state.payment_status) === -1;
        if (settled) { window.location.reload(); return; }
        if (tries < 120) { window.setTimeout(check, 3000); }
      })
      .catch(function () { if (tries < 120) { window.setTimeout(check, 5000); } });
  }
  window.setTimeout(check, 3000);
})();
